"""The batched hybrid cache of the server: one slot per running sequence, rows of different lengths.

Each running sequence owns row `r` of every layer's state: its K/V in (max_batch, kv_heads, capacity,
head_dim) buffers (a sub-tensor cache, as `quintet.deploy.kv_cache`, with one more axis), and its conv and
SSM states in (max_batch, ...) buffers. Running rows are kept contiguous (0..n-1): a finished sequence's
row is filled by moving the last one, so a decode step works on views `[:n]`, never on a gathered copy.

A decode step over rows [start, end) goes through `RowsView`, which implements the cache protocol the
engine's layers call (update_kv, mamba_state, set_mamba_state, get_seq_length, advance) plus
`row_attention_mask`: each row writes its new K/V at its own length and attends to its own keys only.
Jamba attention has no positional encoding, so that mask is all rows of different lengths need.

Prompts are prefilled alone (batch 1) in a `SubTensorKVCache`, then copied into a free row (`load`).
"""

from __future__ import annotations

import torch

from quintet.deploy.kv_cache import SubTensorKVCache, decode_dtypes, round_up


class SlotCache:
    """The decode state of up to `max_batch` sequences of up to `max_length` tokens each."""

    def __init__(self, max_batch: int, max_length: int, pad_multiple: int = 64):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch = {max_batch!r}: must be a positive integer")
        self.max_batch = max_batch
        self.pad_multiple = pad_multiple
        self.capacity = round_up(max_length, pad_multiple)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.conv: dict[int, torch.Tensor] = {}
        self.ssm: dict[int, torch.Tensor] = {}
        self.lengths = torch.zeros(max_batch, dtype=torch.long)

    def _buffer(
        self, store: dict[int, torch.Tensor], layer: int, like: torch.Tensor, tail: tuple
    ) -> torch.Tensor:
        buf = store.get(layer)
        if buf is None:
            buf = torch.zeros((self.max_batch, *tail), dtype=like.dtype, device=like.device)
            store[layer] = buf
        return buf

    def load(self, row: int, source: SubTensorKVCache) -> None:
        """Copy a prefilled batch-1 sequence into `row`."""
        n = source.get_seq_length()
        if n >= self.capacity:
            raise ValueError(f"load: {n} tokens do not fit the slots' {self.capacity}")
        for layer, k in enumerate(source.keys):
            if k is None:
                continue
            v = source.values[layer]
            kb = self._buffer(self.keys, layer, k, (k.shape[1], self.capacity, k.shape[3]))
            vb = self._buffer(self.values, layer, v, (v.shape[1], self.capacity, v.shape[3]))
            kb[row, :, :n].copy_(k[0, :, :n])
            vb[row, :, :n].copy_(v[0, :, :n])
        for layer, conv in enumerate(source.conv_states):
            if conv is None:
                continue
            ssm = source.ssm_states[layer]
            self._buffer(self.conv, layer, conv, conv.shape[1:])[row].copy_(conv[0])
            self._buffer(self.ssm, layer, ssm, ssm.shape[1:])[row].copy_(ssm[0])
        self.lengths[row] = n

    def move(self, src: int, dst: int) -> None:
        """Move the sequence of row `src` to row `dst` (to keep running rows contiguous)."""
        n = int(self.lengths[src])
        for store in (self.keys, self.values):
            for buf in store.values():
                buf[dst, :, :n].copy_(buf[src, :, :n])
        for store in (self.conv, self.ssm):
            for buf in store.values():
                buf[dst].copy_(buf[src])
        self.lengths[dst] = n
        self.lengths[src] = 0

    def free(self, row: int) -> None:
        self.lengths[row] = 0

    def rows(self, start: int, end: int) -> RowsView:
        return RowsView(self, start, end)

    def nbytes(self) -> int:
        stores = (self.keys, self.values, self.conv, self.ssm)
        return sum(t.nbytes for store in stores for t in store.values())


class RowsView:
    """Rows [start, end) of a `SlotCache` as the cache of one decode step (one new token per row)."""

    def __init__(self, slots: SlotCache, start: int, end: int):
        self.slots, self.start, self.end = slots, start, end
        self.pad_multiple = slots.pad_multiple
        self.positions = slots.lengths[start:end].clone()  # where each row's new token goes

    def get_seq_length(self) -> int:
        return int(self.positions.max())

    def update_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if k.shape[2] != 1:
            raise ValueError(f"RowsView.update_kv: one new token per row, got {k.shape[2]}")
        s, e = self.start, self.end
        rows = torch.arange(s, e)
        kb, vb = self.slots.keys[layer], self.slots.values[layer]
        kb[rows, :, self.positions] = k[:, :, 0]
        vb[rows, :, self.positions] = v[:, :, 0]
        t = min(round_up(self.get_seq_length() + 1, self.pad_multiple), self.slots.capacity)
        return kb[s:e, :, :t], vb[s:e, :, :t]

    def row_attention_mask(self, keys: int) -> torch.Tensor:
        """(rows, 1, 1, keys): row i attends to its own positions 0..positions[i] (the new token too)."""
        return (torch.arange(keys)[None, :] <= self.positions[:, None])[:, None, None]

    def decode_state(self, mamba_layers: list[int], attention_layers: list[int], rows: int) -> tuple | None:
        """These rows' states and K/V buffers, views that a native decode step (`quintet.deploy.decode_plan`)
        updates in place, and where each row's new token goes; None where it cannot run."""
        s, e = self.start, self.end
        slots = self.slots
        if rows != e - s or int(self.positions.max()) >= slots.capacity:
            return None
        try:
            conv = [slots.conv[i][s:e] for i in mamba_layers]
            ssm = [slots.ssm[i][s:e] for i in mamba_layers]
            keys = [slots.keys[i][s:e] for i in attention_layers]
            values = [slots.values[i][s:e] for i in attention_layers]
        except KeyError:  # a layer's buffers are made by the first sequence loaded
            return None
        if not decode_dtypes(conv + ssm, keys + values):
            return None
        return conv, ssm, keys, values, self.positions

    def mamba_state(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.slots.conv[layer][self.start : self.end], self.slots.ssm[layer][self.start : self.end]

    def set_mamba_state(self, layer: int, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> None:
        self.slots.conv[layer][self.start : self.end].copy_(conv_state)
        self.slots.ssm[layer][self.start : self.end].copy_(ssm_state)

    def advance(self, num_tokens: int) -> None:
        self.slots.lengths[self.start : self.end] += num_tokens
