"""A mixture sampler over named token sources: fixed-length windows, by weight, seeded, resumable.

    sampler = MixtureSampler("runs/data/shards", {"en": 0.4, "fi": 0.15, "code": 0.45}, seq_len=256, seed=0)
    tokens, source = next(sampler)          # seq_len int64 ids: documents packed, eos-separated
    state = sampler.state_dict()            # save with the checkpoint
    sampler.load_state_dict(state)          # ... and continue exactly where it stopped

Which source: deterministic weighted round robin (stride scheduling). Draw k goes to the source whose share
is furthest behind its weight, `argmax_s (k + 1) * w_s - drawn_s`, so after n draws every source has
`n * w_s` windows, give or take one: token counts follow the weights to within one window, not only on
average. Which window: each source's token stream is cut into `seq_len` windows; each pass over them
(an epoch of that source) visits them in a fresh permutation from `(seed, source, epoch)`, and later epochs
shift the window grid by a random offset so they do not repeat the same cuts.

The state is the seed, the weights, seq_len and how many windows each source has given: nothing else is
needed to continue, and a state from other weights or another seq_len is refused.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from quintet.data.shards import ShardError, TokenStream, load_index

STATE_VERSION = 1


class Window(NamedTuple):
    tokens: np.ndarray  # int64, shape (seq_len,)
    source: str


def _as_list(index_or_dirs: Any) -> list[str | os.PathLike]:
    return list(index_or_dirs) if isinstance(index_or_dirs, (list, tuple)) else [index_or_dirs]


def open_sources(index_or_dirs: Any, split: str = "train") -> dict[str, TokenStream]:
    """Every source of one or more shard indexes (same tokenizer), as token streams of `split`."""
    streams: dict[str, TokenStream] = {}
    tokenizer: str | None = None
    for item in _as_list(index_or_dirs):
        index = load_index(item)
        sha = index["tokenizer"]["sha256"]
        if tokenizer is not None and sha != tokenizer:
            raise ShardError(f"{index['root']}: made with another tokenizer ({sha[:12]} != {tokenizer[:12]})")
        tokenizer = sha
        for source, splits in index["sources"].items():
            if source in streams:
                raise ShardError(f"{index['root']}: source {source!r} appears in two indexes")
            if split in splits:
                streams[source] = TokenStream.open(index, source, split)
    return streams


class MixtureSampler:
    """Yields `Window(tokens, source)` forever: `seq_len` tokens from sources drawn by weight."""

    def __init__(
        self, index_or_dirs: Any, weights: dict[str, float], seq_len: int, seed: int = 0, split: str = "train"
    ):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len = {seq_len!r}: must be a positive integer")
        if not weights:
            raise ValueError("weights: empty; give a weight per source, e.g. {'en': 0.5, 'code': 0.5}")
        for source, w in weights.items():
            if not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0 or not np.isfinite(w):
                raise ValueError(f"weights[{source!r}] = {w!r}: must be a non-negative number")
        total = float(sum(weights.values()))
        if total <= 0:
            raise ValueError(f"weights {weights}: at least one must be positive")
        streams = open_sources(index_or_dirs, split)
        unknown = [s for s in weights if s not in streams]
        if unknown:
            raise ShardError(
                f"weights name sources {unknown} that are not in the shards: {', '.join(streams)}"
            )
        self.sources = [s for s in weights if weights[s] > 0]
        self.weights = {s: weights[s] / total for s in self.sources}
        self.streams = {s: streams[s] for s in self.sources}
        for s, stream in self.streams.items():
            if len(stream) < seq_len:
                raise ShardError(
                    f"source {s!r} ({split}) has {len(stream)} tokens, fewer than seq_len = {seq_len}"
                )
        self.seq_len, self.seed, self.split = seq_len, seed, split
        self.drawn = dict.fromkeys(self.sources, 0)
        self._epoch_cache: dict[str, tuple[int, int, np.ndarray]] = {}

    # -------------------------------------------------------------------------------------------- drawing
    def next_source(self) -> str:
        """The source of the next window (stride scheduling; ties go to the source listed first)."""
        step = sum(self.drawn.values()) + 1
        return max(self.sources, key=lambda s: step * self.weights[s] - self.drawn[s])

    def _epoch(self, source: str, epoch: int) -> tuple[int, np.ndarray]:
        cached = self._epoch_cache.get(source)
        if cached is not None and cached[0] == epoch:
            return cached[1], cached[2]
        rng = np.random.default_rng([self.seed, zlib.crc32(source.encode()), epoch])
        n_tokens = len(self.streams[source])
        offset = int(rng.integers(0, min(self.seq_len, n_tokens - self.seq_len + 1))) if epoch else 0
        order = rng.permutation((n_tokens - offset) // self.seq_len)
        self._epoch_cache[source] = (epoch, offset, order)
        return offset, order

    def window_start(self, source: str, k: int) -> int:
        """Token offset of the k-th window drawn from `source`."""
        epoch, i = 0, k
        while True:  # epochs can differ in length by one window (their offsets differ)
            offset, order = self._epoch(source, epoch)
            if i < len(order):
                return offset + int(order[i]) * self.seq_len
            i -= len(order)
            epoch += 1

    def __iter__(self) -> Iterator[Window]:
        return self

    def __next__(self) -> Window:
        source = self.next_source()
        start = self.window_start(source, self.drawn[source])
        self.drawn[source] += 1
        return Window(self.streams[source].read(start, self.seq_len), source)

    def batch(self, size: int) -> tuple[np.ndarray, list[str]]:
        """`size` windows stacked as an int64 array (size, seq_len), and their sources."""
        windows = [next(self) for _ in range(size)]
        return np.stack([w.tokens for w in windows]), [w.source for w in windows]

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "split": self.split,
            "weights": dict(self.weights),
            "drawn": dict(self.drawn),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (a `state_dict()` of a sampler with the same seed, weights and seq_len)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"sampler state version {state.get('version')!r}: expected {STATE_VERSION}")
        for key in ("seed", "seq_len", "split"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key} = {state[key]!r}, this sampler {getattr(self, key)!r}"
                )
        mine = {s: round(w, 12) for s, w in self.weights.items()}
        theirs = {s: round(w, 12) for s, w in state["weights"].items()}
        if mine != theirs:
            raise ValueError(f"sampler state has weights {state['weights']}, this sampler {self.weights}")
        self.drawn = {s: int(state["drawn"].get(s, 0)) for s in self.sources}

    def tokens_drawn(self) -> dict[str, int]:
        return {s: n * self.seq_len for s, n in self.drawn.items()}


def heldout_windows(index_or_dirs: Any, seq_len: int, max_tokens: int) -> dict[str, list[Any]]:
    """Per source, its held-out tokens cut into consecutive `seq_len` windows (torch int64), up to max_tokens.

    A held-out split shorter than `seq_len` gives one shorter window (if it has at least 2 tokens).
    """
    import torch

    out: dict[str, list[Any]] = {}
    for source, stream in sorted(open_sources(index_or_dirs, "heldout").items()):
        n = min(len(stream), max(max_tokens, seq_len))
        windows = [stream.read(i, seq_len) for i in range(0, n - seq_len + 1, seq_len)]
        if not windows and len(stream) >= 2:
            windows = [stream.read(0, len(stream))]
        out[source] = [torch.from_numpy(w) for w in windows]
    return out
