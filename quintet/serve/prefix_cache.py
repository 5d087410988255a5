"""Prefix reuse for the hybrid cache: snapshots of (K/V rows, conv state, SSM state) at exact token counts.

A Mamba state cannot be sliced like a KV cache (it summarises every token so far), so reuse needs the state
at the exact token where a shared prefix ends. Jamba's is small and fixed in size, so after prefilling a
prompt the scheduler keeps it at the points a later request may share: where the rendered system prompt
and earlier chat turns end, every `snapshot_every` tokens, and at the end of the prompt. A request resumes
from the longest stored prefix of its tokens.

Token-exact by construction: a prompt is prefilled in chunks that end at its own snapshot points, and a
snapshot is stored under its tokens and the chunk ends that led to it. A request looks up only its own
chunk ends with its own earlier chunk ends, so resuming runs exactly the computation a miss runs from
there (same inputs, same shapes): greedy output with and without reuse is identical.

An LRU store bounded in bytes (`--prefix-cache-mb`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from quintet.deploy.kv_cache import SubTensorKVCache


@dataclass
class Snapshot:
    tokens: tuple[int, ...]
    keys: dict[int, torch.Tensor]  # layer -> (1, kv_heads, n, head_dim)
    values: dict[int, torch.Tensor]
    conv: dict[int, torch.Tensor]
    ssm: dict[int, torch.Tensor]
    nbytes: int

    @classmethod
    def take(cls, cache: SubTensorKVCache, tokens: tuple[int, ...]) -> Snapshot:
        n = cache.get_seq_length()
        keys = {i: k[:, :, :n].clone() for i, k in enumerate(cache.keys) if k is not None}
        values = {i: v[:, :, :n].clone() for i, v in enumerate(cache.values) if v is not None}
        conv = {i: c.clone() for i, c in enumerate(cache.conv_states) if c is not None}
        ssm = {i: s.clone() for i, s in enumerate(cache.ssm_states) if s is not None}
        size = sum(t.nbytes for d in (keys, values, conv, ssm) for t in d.values())
        return cls(tokens, keys, values, conv, ssm, size)

    def restore(self, cache: SubTensorKVCache) -> None:
        """Put this state into an empty batch-1 cache (its buffers allocated if need be)."""
        cache.reset()
        n = len(self.tokens)
        for store, src in ((cache.keys, self.keys), (cache.values, self.values)):
            for layer, t in src.items():
                if store[layer] is None or store[layer].shape[2] < n:
                    shape = (1, t.shape[1], max(cache.capacity, n), t.shape[3])
                    store[layer] = torch.zeros(shape, dtype=cache.dtype, device=cache.device)
                store[layer][:, :, :n].copy_(t)
        for layer in self.conv:
            cache.set_mamba_state(layer, self.conv[layer].clone(), self.ssm[layer].clone())
        cache.seq_length = n


def _key(tokens: tuple[int, ...], chunk_ends: tuple[int, ...]) -> tuple:
    return (len(tokens), hash(tokens), chunk_ends)


class PrefixCache:
    """Snapshots by (prefix tokens, chunk ends before it), least recently used evicted past `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._store: OrderedDict[tuple, Snapshot] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.hit_tokens = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._store)

    def lookup(self, tokens: list[int], points: list[int]) -> Snapshot | None:
        """The longest stored snapshot at one of `points` (this prompt's chunk ends, ascending, each
        shorter than the prompt) whose tokens start `tokens`; counts a hit or a miss."""
        with self._lock:
            for i in range(len(points) - 1, -1, -1):
                n = points[i]
                prefix = tuple(tokens[:n])
                key = _key(prefix, tuple(points[:i]))
                snap = self._store.get(key)
                if snap is not None and snap.tokens == prefix:
                    self._store.move_to_end(key)
                    self.hits += 1
                    self.hit_tokens += n
                    return snap
            self.misses += 1
            return None

    def contains(self, tokens: tuple[int, ...], chunk_ends: tuple[int, ...]) -> bool:
        with self._lock:
            return _key(tokens, chunk_ends) in self._store

    def store(self, snapshot: Snapshot, chunk_ends: tuple[int, ...]) -> None:
        if snapshot.nbytes > self.max_bytes:
            return
        key = _key(snapshot.tokens, chunk_ends)
        with self._lock:
            old = self._store.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._store[key] = snapshot
            self.nbytes += snapshot.nbytes
            while self.nbytes > self.max_bytes:
                _, evicted = self._store.popitem(last=False)
                self.nbytes -= evicted.nbytes
                self.evictions += 1
