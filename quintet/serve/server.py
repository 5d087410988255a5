"""`quintet serve MODEL_DIR`: load a model folder (float or FP4, through `quintet.loading`), start the
scheduler, answer HTTP with uvicorn on 127.0.0.1 unless told otherwise.

    from quintet.serve import serve
    serve("runs/demo/fp4", port=8000, max_batch=8)        # blocks; Ctrl-C stops it
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path

import torch

from quintet.serve.api import ServeState, create_app
from quintet.serve.metrics import Metrics
from quintet.serve.scheduler import Scheduler, SchedulerConfig

log = logging.getLogger("quintet.serve")


def load_state(
    model_dir: str | os.PathLike,
    max_batch: int = 8,
    max_context: int = 4096,
    prefix_cache_mb: float = 256,
    api_key: str | None = None,
    max_queue: int = 64,
    model_name: str | None = None,
    activations: str | None = None,
) -> ServeState:
    """The model of `model_dir` behind a scheduler (not started), as the HTTP layer wants it."""
    from quintet.deploy.engine import JambaEngine, to_engine
    from quintet.loading import load_model_and_tokenizer
    from quintet.models.jamba import JambaForCausalLM

    if prefix_cache_mb < 0:
        raise ValueError(f"prefix_cache_mb = {prefix_cache_mb!r}: must be >= 0 (0 turns prefix reuse off)")
    model, tokenizer = load_model_and_tokenizer(model_dir, activations)
    if isinstance(model, JambaForCausalLM):
        model = to_engine(model)  # the float model with the engine's kernels and cache protocol
    if not isinstance(model, JambaEngine):
        raise ValueError(f"{model_dir}: serve runs Jamba language models, not {type(model).__name__}")
    config = SchedulerConfig(
        max_batch=max_batch,
        max_context=max_context,
        max_queue=max_queue,
        prefix_cache_bytes=int(prefix_cache_mb * 2**20),
    )
    metrics = Metrics()
    metrics.set_gauge("quintet_serve_max_batch", max_batch)
    vocab_limit = min(tokenizer.vocab_size, model.config.vocab_size)
    scheduler = Scheduler(model, vocab_limit, set(model.config.eos_token_ids), config, metrics)
    return ServeState(
        model_id=model_name or Path(model_dir).resolve().name,
        tokenizer=tokenizer,
        scheduler=scheduler,
        metrics=metrics,
        max_context=max_context,
        api_key=api_key,
    )


def serve(
    model_dir: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    threads: int | None = None,
    log_level: str = "info",
    **options,
) -> None:
    """Serve `model_dir` until interrupted; `options` are those of `load_state`."""
    import uvicorn

    if threads is not None:
        torch.set_num_threads(threads)
    state = load_state(model_dir, **options)
    config = uvicorn.Config(
        create_app(state),
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    http = uvicorn.Server(config)
    # HTTP in a thread, the model in this one: the thread that loaded it (see Scheduler.start).
    thread = threading.Thread(target=http.run, name="quintet-http", daemon=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # uvicorn handles signals only in the main thread
    thread.start()
    try:
        state.scheduler.run(keep_going=thread.is_alive)
    except KeyboardInterrupt:
        pass
    except Exception:  # the model failed: kept in scheduler.error, /health answers 503 until stopped
        log.exception("the model failed; requests get errors, /health reports it")
        with contextlib.suppress(KeyboardInterrupt):
            while thread.is_alive():
                thread.join(0.5)
    finally:
        http.should_exit = True
        thread.join(timeout=30)
        signal.signal(signal.SIGTERM, previous)
    if not http.started:
        raise OSError(f"could not listen on {host}:{port} (uvicorn's message is above)")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
