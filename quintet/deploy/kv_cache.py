"""The sub-tensor KV cache of Transformer-Lite: one buffer per attention layer, past K/V are views of it.

`HybridCache` (the model's own) concatenates each step's K/V onto the past, a copy of the whole cache per
step. Here each attention layer owns one preallocated buffer, (batch, kv_heads, capacity, head_dim); a step
writes its new K/V into the next free slots in place and gets back views of the buffer, never a copy.

The attended length is padded up to a multiple of `pad_multiple` (64 by default): the views handed to
attention are `[:, :, :roundup(past + new, pad_multiple)]` and the slots past the real tokens are masked
out. So during decoding the shapes that attention sees change once every `pad_multiple` steps, not at
every step (what lets a compiled graph or a memory plan be reused). The buffer is zero-filled at
allocation, so masked slots never hold NaN.

When a sequence outgrows `capacity`, the buffer is replaced by one twice as large (one copy, counted in
`reallocations`); size `max_length` to the longest generation to avoid it.

Mamba layers keep their conv and SSM states as in `HybridCache` (their size does not grow).
"""

from __future__ import annotations

import torch

from quintet.models.jamba.cache import HybridCache
from quintet.models.jamba.configuration import JambaConfig


def decode_dtypes(states: list[torch.Tensor], kv: list[torch.Tensor]) -> bool:
    """Whether a native decode step can update these buffers: float32 Mamba states, and K/V buffers all
    float32 or all float16."""
    kinds = {t.dtype for t in kv}
    floats = all(t.dtype == torch.float32 for t in states)
    return floats and len(kinds) <= 1 and kinds <= {torch.float32, torch.float16}


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class SubTensorKVCache(HybridCache):
    """`HybridCache` (its Mamba states, length and byte count) with preallocated, in-place K/V buffers."""

    def __init__(
        self,
        config: JambaConfig,
        max_length: int = 4096,
        pad_multiple: int = 64,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ):
        if not isinstance(pad_multiple, int) or pad_multiple < 1:
            raise ValueError(f"pad_multiple = {pad_multiple!r}: must be a positive integer (1 = no padding)")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length = {max_length!r}: must be a positive integer")
        super().__init__(config)
        self.pad_multiple = pad_multiple
        self.capacity = round_up(max_length, pad_multiple)
        self.dtype = dtype
        self.device = torch.device(device)
        self.reallocations = 0
        # decode_state's lists, kept while no buffer is replaced: a decode step runs right after the
        # previous one has streamed every weight through the caches, so rebuilding and checking them in
        # Python each step costs several times its warm time (benchmarks/decode_call.py)
        self._decode_lists: tuple | None = None

    def buffers_changed(self) -> None:
        """Forget what `decode_state` kept: call after replacing a buffer or state by assignment."""
        self._decode_lists = None

    def set_mamba_state(self, layer: int, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> None:
        super().set_mamba_state(layer, conv_state, ssm_state)
        self._decode_lists = None

    def attended_length(self, length: int) -> int:
        """The key length attention sees when `length` tokens are real: rounded up to `pad_multiple`."""
        return min(round_up(length, self.pad_multiple), self.capacity)

    def _allocate(self, layer: int, like: torch.Tensor, needed: int) -> None:
        b, h, _, d = like.shape
        old_k, old_v = self.keys[layer], self.values[layer]
        if needed > self.capacity:
            self.capacity = max(2 * self.capacity, round_up(needed, self.pad_multiple))
        if old_k is not None:
            self.reallocations += 1
        shape = (b, h, self.capacity, d)
        new_k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        new_v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if old_k is not None:
            new_k[:, :, : self.seq_length].copy_(old_k[:, :, : self.seq_length])
            new_v[:, :, : self.seq_length].copy_(old_v[:, :, : self.seq_length])
        self.keys[layer], self.values[layer] = new_k, new_v
        self._decode_lists = None

    def update_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v (b, kv_heads, L, head_dim) in place; return views of the buffer over the
        attended length (the real `past + L` tokens, then masked padding)."""
        start = self.seq_length
        end = start + k.shape[2]
        buf = self.keys[layer]
        if buf is None or end > buf.shape[2]:
            self._allocate(layer, k, end)
        elif buf.shape[0] != k.shape[0]:
            raise ValueError(f"update_kv: batch {k.shape[0]}, but the cache holds batch {buf.shape[0]}")
        self.keys[layer][:, :, start:end].copy_(k)
        self.values[layer][:, :, start:end].copy_(v)
        t = self.attended_length(end)
        return self.keys[layer][:, :, :t], self.values[layer][:, :, :t]

    def decode_state(self, mamba_layers: list[int], attention_layers: list[int], rows: int) -> tuple | None:
        """What a native decode step (`quintet.deploy.decode_plan`) updates in place for one new token per
        row: (conv states, SSM states, K buffers, V buffers, positions); None where it cannot (no prompt
        yet, another dtype or batch, a K/V buffer that must grow first: the modules run that step)."""
        kept = self._decode_lists
        if kept is None or kept[0] is not mamba_layers or kept[1] is not attention_layers or kept[2] != rows:
            buffers = self._decode_buffers(mamba_layers, attention_layers, rows)
            kept = self._decode_lists = (mamba_layers, attention_layers, rows, buffers)
        lists = kept[3]
        if lists is None or lists[4] <= self.seq_length:
            return None
        return lists[0], lists[1], lists[2], lists[3], torch.full((rows,), self.seq_length, dtype=torch.long)

    def _decode_buffers(self, mamba_layers: list[int], attention_layers: list[int], rows: int):
        """decode_state's lists and the K/V buffers' capacity, or None where the buffers do not fit."""
        conv = [self.conv_states[i] for i in mamba_layers]
        ssm = [self.ssm_states[i] for i in mamba_layers]
        keys = [self.keys[i] for i in attention_layers]
        values = [self.values[i] for i in attention_layers]
        for t in conv + ssm + keys + values:
            if t is None or t.shape[0] != rows or not t.is_contiguous():
                return None
        if not decode_dtypes(conv + ssm, keys + values):
            return None
        return conv, ssm, keys, values, min((k.shape[2] for k in keys), default=1 << 62)

    def reset(self) -> None:
        """Start a new sequence in the same buffers (no reallocation)."""
        self.seq_length = 0
        self.conv_states = [None] * len(self.conv_states)
        self.ssm_states = [None] * len(self.ssm_states)
        self._decode_lists = None
