"""M0E4 modules that replace `nn.Linear` and `nn.Embedding`: 4-bit codes in memory, multiplied as stored.

Stored (the state dict, what a quantized folder holds), per module:
    qweight  uint8   (N, K / 2)      codes two per byte (see `m0e4.pack_codes`)
    scales   float16 (N, K / group)  S
    offsets  float16 (N, K / group)  c                  w = (fp16(0x3C00 | q << 6) - c) * S
    bias     (Linear only, when the original has one)

An engine may hold a Linear's three buffers in the kernels' decode layout instead (`use_decode_layout`,
where that layout's int8 GEMV runs; `quintet.kernels.m0e4_cpu.to_decode_layout`): the same bytes in
another order. `row_layout()` gives them back in the stored layout.

Run time: nothing else. `M0E4Linear` multiplies through `quintet.kernels.m0e4_cpu.m0e4_matmul` (a
register-unpacking GEMV for decode-sized inputs, dequantized tiles in a reused scratch buffer for prefill),
so a loaded FP4 model holds its weights in 4 bits and no float copy of them.
"""

from __future__ import annotations

import torch
from torch import nn

from quintet.kernels.m0e4 import M0E4Tensor, code_to_fp16, dequantize, pack_codes, unpack_codes
from quintet.kernels.m0e4_cpu import TILE_ROWS, m0e4_matmul, to_decode_layout, to_row_layout


class _KeepsStorageTypes(nn.Module):
    """`model.to(dtype)` / `.half()` move the 4-bit codes and their float16 scales and offsets between
    devices but never change their types (a float16 -> float32 -> float16 round trip is exact)."""

    def _apply(self, fn, recurse: bool = True):
        kept = {name: b.dtype for name, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for name, dtype in kept.items():
            if self._buffers[name].dtype != dtype:
                self._buffers[name] = self._buffers[name].to(dtype)
        return self


class M0E4Linear(_KeepsStorageTypes):
    """y = x W^T + b with W in M0E4; computes in float32, returns the input's dtype."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        bias: bool = False,
        bias_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("offsets", torch.ones(out_features, groups, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device)) if bias else None

    @classmethod
    def from_quantized(cls, q: M0E4Tensor, bias: torch.Tensor | None = None) -> M0E4Linear:
        n, k = q.shape
        module = cls(k, n, q.group_size, bias=bias is not None)
        module.qweight.copy_(pack_codes(q.codes))
        module.scales.copy_(q.scales)
        module.offsets.copy_(q.offsets)
        if bias is not None:
            module.bias.data = bias.detach().clone()
        return module

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )

    def row_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qweight, scales, offsets) in the stored layout, whichever this module holds."""
        return to_row_layout(self.qweight, self.scales, self.offsets)

    def use_decode_layout(self) -> bool:
        """Hold the buffers in the kernels' decode layout (in place of the row layout: no second copy), where
        the shape allows it (out_features a multiple of 16, in_features of 128); True if they are now."""
        if self.qweight.dim() == 3:
            return True
        if self.out_features % TILE_ROWS or self.in_features % 128 or self.qweight.device.type != "cpu":
            return False
        self.qweight, self.scales, self.offsets = to_decode_layout(self.qweight, self.scales, self.offsets)
        return True

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.row_layout()[0])

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        _, scales, offsets = self.row_layout()
        return dequantize(self.codes(), scales, offsets, self.group_size, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in float32, computed at each access: for code that reads `.weight`
        directly instead of calling the module (slow; `quantize` skips such modules where it knows them)."""
        return self.dequantized_weight(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return m0e4_matmul(x, self.qweight, self.scales, self.offsets, self.group_size, self.bias)


def _make_byte_table(device: torch.device) -> torch.Tensor:
    """byte -> the two h = 1 + q/16 it packs (by the bit trick), (256, 2) float32: 2 KiB."""
    every_byte = torch.arange(256, dtype=torch.uint8, device=device)
    return code_to_fp16(unpack_codes(every_byte.view(256, 1))).float()


# made at import, so that no lookup (nor a tracer recording one) ever builds it
_BYTE_TABLES: dict[torch.device, torch.Tensor] = {torch.device("cpu"): _make_byte_table(torch.device("cpu"))}


def _byte_table(device: torch.device) -> torch.Tensor:
    table = _BYTE_TABLES.get(device)
    if table is None:
        table = _BYTE_TABLES[device] = _BYTE_TABLES[torch.device("cpu")].to(device)
    return table


class M0E4Embedding(_KeepsStorageTypes):
    """An embedding table in M0E4: the rows of the looked-up ids are dequantized (bit trick) on the fly."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        group_size: int,
        padding_idx: int | None = None,
        out_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.group_size = num_embeddings, embedding_dim, group_size
        self.padding_idx = padding_idx
        self.out_dtype = out_dtype
        groups = embedding_dim // group_size
        self.register_buffer(
            "qweight", torch.zeros(num_embeddings, embedding_dim // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer("scales", torch.ones(num_embeddings, groups, dtype=torch.float16, device=device))
        self.register_buffer(
            "offsets", torch.ones(num_embeddings, groups, dtype=torch.float16, device=device)
        )

    @classmethod
    def from_quantized(cls, q: M0E4Tensor, padding_idx: int | None = None) -> M0E4Embedding:
        n, k = q.shape
        module = cls(n, k, q.group_size, padding_idx)
        module.qweight.copy_(pack_codes(q.codes))
        module.scales.copy_(q.scales)
        module.offsets.copy_(q.offsets)
        return module

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, group_size={self.group_size}"

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(unpack_codes(self.qweight), self.scales, self.offsets, self.group_size, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        g = self.embedding_dim // self.group_size
        h = _byte_table(self.qweight.device)[self.qweight[flat].int()]  # (n, K / 2, 2)
        h = h.view(-1, g, self.group_size)
        c = self.offsets[flat].float().unsqueeze(-1)  # only the looked-up rows' parameters, in float32
        s = self.scales[flat].float().unsqueeze(-1)
        w = (h - c) * s
        return w.view(*ids.shape, self.embedding_dim).to(self.out_dtype)
