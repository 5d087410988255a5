"""M0E4: the 4-bit weight format of Transformer-Lite (arXiv 2403.20041), as we read it.

A 4-bit code q in 0..15 becomes a float16 with two bitwise operations and no int->float conversion:

    bits = 0x3C00 | (q << 6)        sign 0, exponent field 15 (= the bias, so 2^0), mantissa q << 6
    h    = bits viewed as float16   = 1 + (q << 6) / 2^10 = 1 + q / 16           (exactly)

and a weight of group j of a row is `w = (h - c_j) * S_j`, with a per-group float16 scale S and float16
offset c. In the usual asymmetric form `w = (q - z) * s` this is `s = S / 16` and `z = 16 (c - 1)`, a float
zero point: a 16-level affine grid, the grid of GPTQ / AWQ and of PyTorch's CPU int4 kernel.

Shapes: a Linear weight W is (N, K) = (out_features, in_features); groups run along K, so codes are
(N, K), scales and offsets (N, K / group_size). Codes are stored two per byte along K: byte k // 2 holds
code 2i in its low nibble and code 2i + 1 in its high nibble.

PyTorch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`) computes with `w = (q - 8) * scale + zero`,
scale and zero in bfloat16, (K / group_size, N, 2). From M0E4:

    scale = S / 16,    zero = S * (1.5 - c)        [(q - 8) S/16 + S (1.5 - c) = (1 + q/16 - c) S]

The codes carry over bit for bit; scale and zero are computed exactly (float64) and rounded once each to
bfloat16, the kernel's parameter type: a relative change of at most 2^-9 of a group's scale and zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_SIZES = (32, 64, 128)
M0E4_ONE = 0x3C00  # float16 bits of 1.0: the exponent field at its bias, mantissa 0
CODE_SHIFT = 6  # 10 mantissa bits - 4 code bits: q lands in the top 4 mantissa bits
INT4_MIN_GROUP = 32  # the CPU int4 kernel's smallest supported group


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


# ------------------------------------------------------------------------------------------- CPU int4 layout
def int4_scale_zero(scales: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 kernel's (scale, zero) of each group, exact in float64: S / 16 and S (1.5 - c)."""
    S, c = scales.double(), offsets.double()
    return S / 16.0, S * (1.5 - c)


def to_cpu_int4(
    codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int, inner_k_tiles: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and parameters in the layout of `torch.ops.aten._weight_int4pack_mm_for_cpu`.

    Returns (packed weight, scale_and_zeros (K / group_size, N, 2) bfloat16). The packing is PyTorch's own
    op (its byte order depends on the CPU's instruction set, so it is made at load time, never stored).
    """
    _check_params(codes, scales, offsets, group_size)
    if group_size < INT4_MIN_GROUP:
        raise QuantizationError(f"group_size = {group_size}: the CPU int4 kernel needs >= {INT4_MIN_GROUP}")
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        codes.to(torch.int32).contiguous(), inner_k_tiles
    )
    scale, zero = int4_scale_zero(scales, offsets)
    scale_and_zeros = torch.stack([scale.float().t(), zero.float().t()], dim=-1).to(torch.bfloat16)
    return packed, scale_and_zeros.contiguous()


def int4_matmul(
    x: torch.Tensor, packed: torch.Tensor, scale_and_zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """x (M, K) bfloat16 @ W^T with W held by the CPU int4 kernel: (M, N) bfloat16."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_and_zeros)


def codes_from_int4(packed: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Read the codes back out of the int4 kernel's packed weight, through the kernel itself.

    With unit scale and zero 8 the kernel computes w = q exactly (small integers are exact in bfloat16),
    so multiplying the identity returns W^T. Slow (a K x K x N matmul): for tests and checks.
    """
    n = packed.shape[0]
    sz = torch.zeros(k // group_size, n, 2, dtype=torch.bfloat16)
    sz[..., 0] = 1.0
    sz[..., 1] = 8.0
    eye = torch.eye(k, dtype=torch.bfloat16)
    return int4_matmul(eye, packed, sz, group_size).t().to(torch.uint8)


def int4_dequantize(
    packed: torch.Tensor, scale_and_zeros: torch.Tensor, k: int, group_size: int
) -> torch.Tensor:
    """The weight (N, K) as the int4 kernel sees it, in float32 (through the kernel: for tests)."""
    eye = torch.eye(k, dtype=torch.bfloat16)
    return int4_matmul(eye, packed, scale_and_zeros, group_size).t().float()
