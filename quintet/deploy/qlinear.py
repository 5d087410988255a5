"""M0E4 modules that replace `nn.Linear` and `nn.Embedding`: stored codes, two matmul paths at run time.

Stored (the state dict, what a quantized folder holds), per module:
    qweight  uint8   (N, K / 2)      codes two per byte (see `m0e4.pack_codes`)
    scales   float16 (N, K / group)  S
    offsets  float16 (N, K / group)  c                  w = (fp16(0x3C00 | q << 6) - c) * S
    bias     (Linear only, when the original has one)

Run time (built by `prepare`, never stored):
    decode   rows <= `int4_max_rows`: PyTorch's CPU int4 kernel on bfloat16 activations (the dequantization
             happens inside the matmul; weights stay 4-bit in memory)
    prefill  more rows: a bfloat16 copy of the weight (dequantized once, exactly in float32 and rounded to
             bfloat16) and a plain bfloat16 matmul, which beats the int4 kernel at prefill sizes on CPU;
             `prepare(prefill_weight=False)` drops it (4-bit memory only, prefill through the int4 kernel)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from quintet.deploy.m0e4 import (
    INT4_MIN_GROUP,
    M0E4Tensor,
    code_to_fp16,
    dequantize,
    int4_matmul,
    pack_codes,
    to_cpu_int4,
    unpack_codes,
)

INT4_MAX_ROWS = 4  # at most this many rows go through the int4 kernel (benchmarks/deploy_fusions.py)
MATMUL_PATHS = ("auto", "int4", "bf16")
_MATMUL_PATH: ContextVar[str] = ContextVar("m0e4_matmul_path", default="auto")


@contextlib.contextmanager
def matmul_path(path: str) -> Iterator[None]:
    """Choose the matmul of every M0E4Linear called inside: "int4" (the decode kernel), "bf16" (the
    prefill weights) or "auto" (int4 for at most `int4_max_rows` rows). The engine picks per step, so the
    choice depends on the step's shape (decode or prefill), never on data."""
    if path not in MATMUL_PATHS:
        raise ValueError(f"matmul_path = {path!r}: must be one of {', '.join(MATMUL_PATHS)}")
    token = _MATMUL_PATH.set(path)
    try:
        yield
    finally:
        _MATMUL_PATH.reset(token)


def int4_supported(out_features: int, group_size: int) -> bool:
    """Whether the CPU int4 kernel takes this shape (N a multiple of 16, group >= 32); else bfloat16 only."""
    return out_features % 16 == 0 and group_size >= INT4_MIN_GROUP


class M0E4Linear(nn.Module):
    """y = x W^T + b with W in M0E4; computes in bfloat16, returns the input's dtype."""

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
        self.int4_max_rows = INT4_MAX_ROWS
        self._int4: tuple[torch.Tensor, torch.Tensor] | None = None
        self._prefill_weight: torch.Tensor | None = None

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

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.qweight)

    @property
    def prepared(self) -> bool:
        return self._int4 is not None or self._prefill_weight is not None

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes(), self.scales, self.offsets, self.group_size, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in float32, computed at each access: for code that reads `.weight`
        directly instead of calling the module (slow; `quantize` skips such modules where it knows them)."""
        return self.dequantized_weight(torch.float32)

    @torch.no_grad()
    def prepare(self, prefill_weight: bool = True) -> None:
        """Build the run-time forms: the int4 kernel's layout, and the bfloat16 prefill weight if asked."""
        codes = self.codes()
        self._int4 = (
            to_cpu_int4(codes, self.scales, self.offsets, self.group_size)
            if int4_supported(self.out_features, self.group_size) and self.qweight.device.type == "cpu"
            else None
        )
        self._prefill_weight = (
            dequantize(codes, self.scales, self.offsets, self.group_size, torch.bfloat16)
            if prefill_weight or self._int4 is None
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.prepared:
            self.prepare()
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if x2.dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        path = _MATMUL_PATH.get()
        if self._int4 is not None and (
            path == "int4"
            or self._prefill_weight is None
            or (path == "auto" and x2.shape[0] <= self.int4_max_rows)
        ):
            y = int4_matmul(x2 if x2.is_contiguous() else x2.contiguous(), *self._int4, self.group_size)
        else:
            y = F.linear(x2, self._prefill_weight)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if x.dtype != torch.bfloat16:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)


class M0E4Embedding(nn.Module):
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

    @property
    def prepared(self) -> bool:
        return getattr(self, "_lut", None) is not None

    @torch.no_grad()
    def prepare(self) -> None:
        """The run-time tables: byte -> the two h = 1 + q/16 it packs (by the bit trick), and each group's
        (c, S) in float32."""
        every_byte = torch.arange(256, dtype=torch.uint8, device=self.qweight.device)
        self._lut = code_to_fp16(unpack_codes(every_byte.view(256, 1))).float()  # (256, 2)
        self._params = torch.stack([self.offsets.float(), self.scales.float()], dim=-1)  # (V, groups, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.prepared:
            self.prepare()
        lut, params = self._lut, self._params
        flat = ids.reshape(-1)
        g = self.embedding_dim // self.group_size
        h = lut[self.qweight[flat].int()].view(-1, g, self.group_size)  # (n, groups, group_size)
        p = params[flat]  # (n, groups, 2)
        w = (h - p[..., :1]) * p[..., 1:]
        return w.view(*ids.shape, self.embedding_dim).to(self.out_dtype)
