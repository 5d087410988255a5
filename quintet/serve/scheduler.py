"""Continuous batching: requests join and leave the running batch between decode steps.

One thread owns the model. Each turn of its loop:
1. drops cancelled requests (a client that went away frees its slot at once);
2. admits the next waiting request to prefill when a slot is free, resuming from the longest stored
   prefix (`prefix_cache.py`);
3. runs one decode step for every running sequence (one new token each, rows of different lengths in
   one batch, `slots.py`), in groups of at most `gemv_max_rows()` rows so that every row runs the same
   kernels it runs alone;
4. prefills one chunk of the admitted prompt: a long prompt is fed a chunk per turn, interleaved with the
   decode steps, so it does not stall the running sequences. When its last chunk is done it samples its
   first token and joins the running batch.

Exactness: the prompt is prefilled alone, in chunks that end at fixed points of the prompt itself (every
`prefill_chunk` tokens, its prefix boundaries), the same whatever else runs; a decode row runs the
per-row kernels with its own mask. So a greedy request returns the same tokens alone or in a batch.

Requests beyond `max_batch` wait in a queue; past `max_queue` waiting, `submit` raises `QueueFull`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from quintet.deploy.kv_cache import SubTensorKVCache
from quintet.generation import argmax_last, filter_logits
from quintet.kernels.m0e4_cpu import gemv_max_rows
from quintet.serve.metrics import Metrics
from quintet.serve.prefix_cache import PrefixCache, Snapshot
from quintet.serve.slots import SlotCache


class QueueFull(RuntimeError):
    """The server's queue is full; try again later."""


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: the chosen token's and the top k


@dataclass
class TokenEvent:
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class DoneEvent:
    finish_reason: str  # "stop" (a stop token), "length" (max_tokens), "cancelled"
    cached_tokens: int = 0


@dataclass
class Request:
    prompt: list[int]
    sampling: Sampling
    sink: Callable[[object], None]  # called from the scheduler thread with TokenEvent / DoneEvent
    boundaries: tuple[int, ...] = ()  # token counts where a shared prefix ends (system prompt, turns)
    cache_prompt: bool = True
    ignore_eos: bool = False  # run to max_tokens (benchmarks)
    id: str = ""
    cancelled: bool = False
    # the scheduler's
    submitted: float = field(default_factory=time.perf_counter)
    generator: torch.Generator | None = None
    chunk_ends: list[int] = field(default_factory=list)
    snapshot_points: set[int] = field(default_factory=set)
    done_tokens: int = 0  # prompt tokens already in the cache
    cached_tokens: int = 0
    generated: int = 0
    last_token: int = -1
    finish_reason: str = ""


@dataclass
class SchedulerConfig:
    max_batch: int = 8
    max_context: int = 4096
    max_queue: int = 64
    prefill_chunk: int = 128
    snapshot_every: int = 512  # a multiple of prefill_chunk
    prefix_cache_bytes: int = 256 * 2**20
    pad_multiple: int = 64

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_context", "max_queue", "prefill_chunk", "snapshot_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} = {value!r}: must be a positive integer")
        if self.snapshot_every % self.prefill_chunk:
            raise ValueError(
                f"snapshot_every = {self.snapshot_every}: must be a multiple of prefill_chunk = "
                f"{self.prefill_chunk}"
            )


def plan_chunks(n: int, boundaries: tuple[int, ...], chunk: int, every: int) -> tuple[list[int], set[int]]:
    """The chunk ends of an n-token prompt (ascending, the last is n) and the ones to snapshot at."""
    marks = {b for b in boundaries if 0 < b < n}
    ends = sorted(set(range(chunk, n, chunk)) | marks | {n})
    snaps = {e for e in ends if e % every == 0} | marks | {n}
    return ends, snaps


class Scheduler:
    """Owns the model and runs requests with continuous batching in a thread of its own."""

    def __init__(
        self, model, vocab_limit: int, stop_ids: set[int], config: SchedulerConfig, metrics: Metrics
    ):
        self.model = model
        self.vocab_limit = vocab_limit
        self.stop_ids = set(stop_ids)
        self.config = config
        self.metrics = metrics
        self.group = max(1, gemv_max_rows())
        self.slots = SlotCache(config.max_batch, config.max_context + 1, config.pad_multiple)
        self.scratch = SubTensorKVCache(
            model.config, config.max_context + 1, config.pad_multiple, dtype=model.dtype, device=model.device
        )
        self.prefix_cache = PrefixCache(config.prefix_cache_bytes)
        self.waiting: deque[Request] = deque()
        self.prefilling: Request | None = None
        self.running: list[Request] = []  # row i of the slots holds running[i]
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # -------------------------------------------------------------------------------- public, any thread
    def start(self) -> None:
        """Run the loop in a thread of its own (tests, embedding). `quintet serve` calls `run` instead, in
        the thread that loaded the model: on this project's machines the same steps ran 1.7-2x slower in
        a thread other than the one that loaded the model (docs/serving.md)."""
        self._thread = threading.Thread(target=self.run, name="quintet-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, request: Request) -> None:
        with self._cond:
            if len(self.waiting) >= self.config.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the limit, --max-queue)")
            self.waiting.append(request)
            self._update_gauges()
            self._cond.notify_all()

    def cancel(self, request: Request) -> None:
        with self._cond:
            request.cancelled = True
            self._cond.notify_all()

    # -------------------------------------------------------------------------------- the loop
    def run(self, keep_going: Callable[[], bool] = lambda: True) -> None:
        """The loop, in the calling thread, until `stop()` or `keep_going()` is false (checked at least
        every half second). A model failure is kept in `error` (the health endpoint reports it), every open
        request is told, and the exception propagates."""
        try:
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while not self._stop and not self._has_work() and keep_going():
                            self._cond.wait(timeout=0.5)
                        if self._stop or not keep_going():
                            break
                        self._drop_cancelled()
                        self._admit()
                        self._update_gauges()
                    if self.running:
                        self._decode_step()
                    if self.prefilling is not None:
                        self._prefill_chunk()
        except BaseException as err:
            interrupted = isinstance(err, KeyboardInterrupt)
            if not interrupted:
                self.error = err
            self._end_open("shutdown" if interrupted else "error")
            raise
        self._end_open("shutdown")

    def _end_open(self, reason: str) -> None:
        """Tell every request still waiting, prefilling or running that it ends (the loop is leaving)."""
        with self._cond:
            open_ = [*self.waiting, *self.running, *([self.prefilling] if self.prefilling else [])]
            self.waiting.clear()
            self.running.clear()
            self.prefilling = None
        for req in open_:
            req.sink(DoneEvent(reason))

    def _has_work(self) -> bool:
        return bool(self.running or self.prefilling or self.waiting)

    def _update_gauges(self) -> None:
        self.metrics.set_gauge("quintet_serve_queue_length", len(self.waiting))
        self.metrics.set_gauge("quintet_serve_running_sequences", len(self.running))
        busy = len(self.running) + (self.prefilling is not None)
        self.metrics.set_gauge("quintet_serve_slots_in_use", busy)
        self.metrics.set_gauge("quintet_serve_prefix_cache_bytes", self.prefix_cache.nbytes)
        self.metrics.set_gauge("quintet_serve_prefix_cache_entries", len(self.prefix_cache))

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(req)
            req.sink(DoneEvent("cancelled"))
        if self.prefilling is not None and self.prefilling.cancelled:
            self.prefilling.sink(DoneEvent("cancelled"))
            self.prefilling = None
        for req in [r for r in self.running if r.cancelled]:
            self._retire(req, "cancelled")

    def _retire(self, req: Request, reason: str) -> None:
        row = self.running.index(req)
        last = len(self.running) - 1
        if row != last:
            self.slots.move(last, row)
            self.running[row] = self.running[last]
        else:
            self.slots.free(row)
        self.running.pop()
        req.sink(DoneEvent(reason, req.cached_tokens))

    def _admit(self) -> None:
        if self.prefilling is not None or not self.waiting or len(self.running) >= self.config.max_batch:
            return
        req = self.waiting.popleft()
        cfg = self.config
        req.chunk_ends, req.snapshot_points = plan_chunks(
            len(req.prompt), req.boundaries, cfg.prefill_chunk, cfg.snapshot_every
        )
        s = req.sampling
        if s.temperature > 0:
            seed = s.seed if s.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
            req.generator = torch.Generator().manual_seed(seed)
        self.scratch.reset()
        req.done_tokens = 0
        if req.cache_prompt and self.prefix_cache.enabled:
            snap = self.prefix_cache.lookup(req.prompt, req.chunk_ends[:-1])
            if snap is not None:
                snap.restore(self.scratch)
                req.done_tokens = req.cached_tokens = len(snap.tokens)
                self.metrics.inc("quintet_serve_prefix_cache_hits_total")
                self.metrics.inc("quintet_serve_prefix_cache_hit_tokens_total", req.cached_tokens)
            else:
                self.metrics.inc("quintet_serve_prefix_cache_misses_total")
        self.prefilling = req

    # -------------------------------------------------------------------------------- model steps
    def _prefill_chunk(self) -> None:
        req = self.prefilling
        start = req.done_tokens
        end = next(e for e in req.chunk_ends if e > start)
        ids = torch.tensor([req.prompt[start:end]], dtype=torch.long, device=self.model.device)
        logits = self.model(ids, cache=self.scratch, logits_to_keep=1).logits
        req.done_tokens = end
        self.metrics.inc("quintet_serve_prefill_tokens_total", end - start)
        if req.cache_prompt and self.prefix_cache.enabled and end in req.snapshot_points:
            tokens = tuple(req.prompt[:end])
            before = tuple(e for e in req.chunk_ends if e < end)
            if not self.prefix_cache.contains(tokens, before):
                self.prefix_cache.store(Snapshot.take(self.scratch, tokens), before)
        if end < len(req.prompt):
            return
        with self._cond:
            self.prefilling = None
            if req.cancelled:
                req.sink(DoneEvent("cancelled"))
                return
            self.metrics.observe(
                "quintet_serve_time_to_first_token_seconds", time.perf_counter() - req.submitted
            )
            if self._emit(req, logits[0, -1]):
                self.slots.load(len(self.running), self.scratch)
                self.running.append(req)
            else:
                req.sink(DoneEvent(req.finish_reason, req.cached_tokens))
            self._update_gauges()

    def _decode_step(self) -> None:
        rows = list(self.running)
        n = len(rows)
        self.metrics.observe("quintet_serve_batch_size", n)
        tokens = torch.tensor([[r.last_token] for r in rows], dtype=torch.long, device=self.model.device)
        pieces = []
        for start in range(0, n, self.group):
            end = min(start + self.group, n)
            out = self.model(tokens[start:end], cache=self.slots.rows(start, end), logits_to_keep=1)
            pieces.append(out.logits[:, -1])
        logits = torch.cat(pieces)
        with self._cond:
            finished = []
            for i, req in enumerate(rows):
                if req.cancelled:
                    continue  # dropped at the top of the next turn
                if not self._emit(req, logits[i]):
                    finished.append(req)
            for req in finished:
                self._retire(req, req.finish_reason)
            self._update_gauges()

    def _emit(self, req: Request, logits: torch.Tensor) -> bool:
        """Pick the next token of `req` from its logits (V,), send it; False when the request is done."""
        s = req.sampling
        scores = logits[: self.vocab_limit].float()
        if s.temperature > 0:
            probs = torch.softmax(filter_logits(scores[None] / s.temperature, 0, s.top_p), dim=-1)[0]
            token = int(torch.multinomial(probs, 1, generator=req.generator))
        else:
            token = int(argmax_last(scores))
        if token in self.stop_ids and not req.ignore_eos:
            req.finish_reason = "stop"
            return False
        event = TokenEvent(token)
        if s.logprobs is not None:
            logp = torch.log_softmax(scores, dim=-1)
            event.logprob = float(logp[token])
            if s.logprobs > 0:
                top = torch.topk(logp, min(s.logprobs, logp.shape[0]))
                event.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        req.last_token = token
        req.generated += 1
        self.metrics.inc("quintet_serve_generation_tokens_total")
        req.sink(event)
        if req.generated >= s.max_tokens:
            req.finish_reason = "length"
            return False
        return True
