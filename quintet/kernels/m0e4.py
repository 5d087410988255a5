"""M0E4: the 4-bit weight format of Transformer-Lite (arXiv 2403.20041), as we read it.

A 4-bit code q in 0..15 becomes a float16 with two bitwise operations and no int->float conversion:

    bits = 0x3C00 | (q << 6)        sign 0, exponent field 15 (= the bias, so 2^0), mantissa q << 6
    h    = bits viewed as float16   = 1 + (q << 6) / 2^10 = 1 + q / 16           (exactly)

and a weight of group j of a row is `w = (h - c_j) * S_j`, with a per-group float16 scale S and float16
offset c. In the usual asymmetric form `w = (q - z) * s` this is `s = S / 16` and `z = 16 (c - 1)`, a float
zero point: a 16-level affine grid, the grid of GPTQ / AWQ and of llama.cpp's Q4_1.

Shapes: a Linear weight W is (N, K) = (out_features, in_features); groups run along K, so codes are
(N, K), scales and offsets (N, K / group_size). Codes are stored two per byte along K: byte k // 2 holds
code 2i in its low nibble and code 2i + 1 in its high nibble.

quintet's CPU kernels (`quintet.kernels.m0e4_cpu`) multiply straight from these codes: in float32 the same
trick reads `0x3F800000 | q << 19` as 1 + q/16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_SIZES = (32, 64, 128)
M0E4_ONE = 0x3C00  # float16 bits of 1.0: the exponent field at its bias, mantissa 0
CODE_SHIFT = 6  # 10 mantissa bits - 4 code bits: q lands in the top 4 mantissa bits


class QuantizationError(ValueError):
    """A tensor cannot be quantized, packed or converted as asked."""


@dataclass
class M0E4Tensor:
    """One quantized weight: codes (N, K) uint8 in 0..15, scales and offsets (N, K / group_size) fp16."""

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.offsets, self.group_size, dtype)


# ------------------------------------------------------------------------------------------- checks
def check_group_size(group_size: int, in_features: int, name: str = "weight") -> None:
    if group_size not in GROUP_SIZES:
        raise QuantizationError(
            f"{name}: group_size = {group_size}: must be one of {', '.join(map(str, GROUP_SIZES))}"
        )
    if in_features % group_size:
        raise QuantizationError(
            f"{name}: in_features = {in_features} is not a multiple of group_size = {group_size}"
        )


def _check_params(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int) -> None:
    n, k = codes.shape
    want = (n, k // group_size)
    for label, t in (("scales", scales), ("offsets", offsets)):
        if tuple(t.shape) != want:
            raise QuantizationError(
                f"{label}: shape {tuple(t.shape)}, expected (N, K / group_size) = {want} for codes "
                f"{(n, k)} and group_size {group_size}"
            )


# ------------------------------------------------------------------------------------------- the bit trick
def code_to_fp16(codes: torch.Tensor) -> torch.Tensor:
    """h = 1 + q/16 from codes 0..15 by two bitwise operations (shift, or) and a reinterpretation."""
    bits = (codes.to(torch.int16) << CODE_SHIFT) | M0E4_ONE
    return bits.view(torch.float16)


def code_to_fp16_reference(codes: torch.Tensor) -> torch.Tensor:
    """h = 1 + q/16 by arithmetic: the definition the bit trick must equal."""
    return (1.0 + codes.to(torch.float64) / 16.0).to(torch.float16)


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """w = (h - c) * S with h from the bit trick; computed in float32 (exact h - c for normal offsets),
    returned as `dtype`. codes (N, K); scales, offsets (N, K / group_size)."""
    _check_params(codes, scales, offsets, group_size)
    n, k = codes.shape
    h = code_to_fp16(codes).float().view(n, k // group_size, group_size)
    w = (h - offsets.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return w.view(n, k).to(dtype)


def dequantize_reference(
    codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int
) -> torch.Tensor:
    """The arithmetic definition, element by element in float64:
    w[n, k] = (1 + q/16 - c[n, k // g]) * S[n, k // g]."""
    n, k = codes.shape
    out = torch.empty(n, k, dtype=torch.float64)
    q = codes.tolist()
    S, c = scales.double().tolist(), offsets.double().tolist()
    for i in range(n):
        for j in range(k):
            g = j // group_size
            out[i, j] = (1.0 + q[i][j] / 16.0 - c[i][g]) * S[i][g]
    return out


# ------------------------------------------------------------------------------------------- quantization
def params_from_range(
    wmin: torch.Tensor, wmax: torch.Tensor, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (S, c) in float16 from the group's min and max, so that code 0 ~ min and code 15 ~ max.

    s = (max - min) / 15, z = -min / s (a float zero point); S = 16 s, c = 1 + z / 16. A constant group
    gets the scale of its magnitude so that its value still lands on a code. The range is widened to hold
    zero, as the usual asymmetric schemes do (zero is then close to a grid point).
    """
    wmin = torch.minimum(wmin.float(), torch.zeros_like(wmin, dtype=torch.float32))
    wmax = torch.maximum(wmax.float(), torch.zeros_like(wmax, dtype=torch.float32))
    span = (wmax - wmin).clamp(min=eps)
    s = span / 15.0
    S = (16.0 * s).to(torch.float16)
    if not torch.isfinite(S).all():
        big = float(span.max())
        raise QuantizationError(
            f"a group spans {big:.4g}: its float16 scale overflows (largest float16: 65504); M0E4 holds "
            "weights whose groups span at most ~61000"
        )
    S = torch.where(S == 0, torch.full_like(S, 2.0**-14), S)  # below float16's normal range
    c = (1.0 - wmin / S.float()).to(torch.float16)
    return S, c


def quantize_with_params(
    w: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Round-to-nearest codes for given (S, c): q = clamp(round(16 (w / S + c - 1)), 0, 15), uint8 (N, K)."""
    n, k = w.shape
    wg = w.float().view(n, k // group_size, group_size)
    q = torch.round(16.0 * (wg / scales.float().unsqueeze(-1) + offsets.float().unsqueeze(-1) - 1.0))
    return q.clamp_(0, 15).to(torch.uint8).view(n, k)


def quantize_rtn(w: torch.Tensor, group_size: int = 64, name: str = "weight") -> M0E4Tensor:
    """Round-to-nearest M0E4 of a (N, K) weight, groups of `group_size` along K, min-max range."""
    if w.dim() != 2:
        raise QuantizationError(f"{name}: expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise QuantizationError(f"{name}: holds NaN or infinite values; cannot quantize")
    n, k = w.shape
    check_group_size(group_size, k, name)
    wg = w.detach().float().view(n, k // group_size, group_size)
    scales, offsets = params_from_range(wg.amin(-1), wg.amax(-1))
    codes = quantize_with_params(w.detach(), scales, offsets, group_size)
    return M0E4Tensor(codes, scales, offsets, group_size)


# ------------------------------------------------------------------------------------------- packing
def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte along the last dimension: low nibble = even index, high nibble = odd index."""
    if codes.shape[-1] % 2:
        raise QuantizationError(f"codes: last dimension {codes.shape[-1]} is odd; cannot pack two per byte")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_codes`: (..., K/2) bytes -> (..., K) codes in 0..15, uint8."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)
