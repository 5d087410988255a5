"""`quintet serve MODEL_DIR`: load a model folder (float or FP4, through `quintet.loading`), start the
scheduler, answer HTTP with uvicorn on 127.0.0.1 unless told otherwise.

    from quintet.serve import serve
    serve("runs/demo/fp4", port=8000, max_batch=8)        # blocks; Ctrl-C stops it
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from quintet.serve.api import ServeState, create_app
from quintet.serve.metrics import Metrics
from quintet.serve.scheduler import Scheduler, SchedulerConfig


def load_state(
    model_dir: str | os.PathLike,
    max_batch: int = 8,
    max_context: int = 4096,
    prefix_cache_mb: float = 256,
    api_key: str | None = None,
    max_queue: int = 64,
    model_name: str | None = None,
) -> ServeState:
    """The model of `model_dir` behind a scheduler (not started), as the HTTP layer wants it."""
    from quintet.deploy.engine import JambaEngine, to_engine
    from quintet.loading import load_model_and_tokenizer
    from quintet.models.jamba import JambaForCausalLM

    if prefix_cache_mb < 0:
        raise ValueError(f"prefix_cache_mb = {prefix_cache_mb!r}: must be >= 0 (0 turns prefix reuse off)")
    model, tokenizer = load_model_and_tokenizer(model_dir)
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
    state.scheduler.start()
    try:
        uvicorn.run(create_app(state), host=host, port=port, log_level=log_level, access_log=False)
    finally:
        state.scheduler.stop()
