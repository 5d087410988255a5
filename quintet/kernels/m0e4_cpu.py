"""Matmuls straight from M0E4 4-bit weights on CPU: y = x W^T with W held as codes, scales and offsets.

    y = m0e4_matmul(x, qweight, scales, offsets, group_size)     # x (..., K) -> (..., N), x's dtype

Weights as `quintet.deploy.qlinear.M0E4Linear` stores them: qweight (N, K/2) uint8 (two codes per byte),
scales and offsets (N, K / group) float16, w = (fp(1 + q/16) - c) * S. Two paths, chosen by the number of
rows of x (`gemv_max_rows()`):

- decode (few rows): `csrc/m0e4_gemm.cpp`'s GEMV / small GEMM. Each output row's bytes are read once and
  unpacked in registers (AVX-512: each group's 16 weights form one register and the codes index it; AVX2
  and scalar: the M0E4 bit trick, `0x3F800000 | q << 19` is the float 1 + q/16), accumulated in float32,
  output rows split over `torch.get_num_threads()` threads.
- prefill (more rows), products in `matmul_dtype()`: float32 or bfloat16, whichever this CPU runs faster,
  measured once per process (bfloat16 only pays where the CPU has native bf16 dot products). Micro-tiles:
  four rows of W at a time dequantized into a per-thread buffer that stays in L1 and multiplied by our own
  register-blocked kernel (AVX-512 BF16 `vdpbf16ps`, or float32 FMA on AVX-512 / AVX2), so each weight is
  dequantized once per call whatever the rows; large tiles: `TILE_BYTES` of the weight dequantized into
  one reused scratch buffer and multiplied by PyTorch's matmul. bfloat16 products on AVX-512 BF16 take
  micro-tiles at every row count (float32 outputs, where PyTorch's bfloat16 matmul rounds its outputs to
  bfloat16, and each row's result independent of the other rows); float32 products take micro-tiles up to
  `MICRO_TILE_MAX_ROWS` rows (a prompt chunk after a cached prefix, the tokens one expert receives) and
  large tiles past them.

Where the int8 GEMV runs (AVX2 or AVX-512), an engine keeps its weights in the decode layout instead
(`to_decode_layout`: rows in tiles of 16, interleaved by 4-byte words, so that one 64-byte load feeds 16
rows' dot products; the kernel's comment has the details). Every op takes both layouts; `weight_rows` and
`to_row_layout` read either.

No float copy of a weight is ever kept. The instruction set is chosen at run time from what the CPU has
(`isa()`); `QUINTET_M0E4_ISA=scalar|avx2|avx512` forces a lower one (tests run each). The extension is
built on first use by `quintet.kernels.build` (cached per machine); if it cannot be, or
`QUINTET_DISABLE_M0E4_KERNEL=1` is set, a PyTorch fallback (dequantize a tile, `F.linear`) runs after
one warning. `QUINTET_MATMUL_DTYPE=float32|bfloat16` skips the prefill measurement.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from quintet.kernels.build import LazyExtension

__all__ = [
    "ISAS",
    "gemv_max_rows",
    "isa",
    "m0e4_kernels_available",
    "m0e4_matmul",
    "matmul_dtype",
    "matmul_path",
    "float_linear",
    "decode_activations",
    "swiglu_gemv",
    "fused_add_rms_norm",
    "measure_float_gemv",
    "decode_layout_runs",
    "to_decode_layout",
    "to_row_layout",
    "weight_rows",
]

DISABLE_ENV = "QUINTET_DISABLE_M0E4_KERNEL"
ISA_ENV = "QUINTET_M0E4_ISA"
DTYPE_ENV = "QUINTET_MATMUL_DTYPE"
ISAS = ("scalar", "avx2", "avx512")  # index = the kernel's isa code
GEMV_MAX_ROWS = 8  # more rows go through dequantized tiles (benchmarks/deploy_fusions.py measures the split)
TILE_BYTES = 1 << 19  # scratch per tile: fits the L2 cache of the CPUs we run on
MICRO_TILE_MAX_ROWS = 96  # up to this many rows, L1 micro-tiles and our own kernel (deploy_fusions measures)
EVERY_ROW = 1 << 40
TILE_ROWS = 16  # rows per tile of the decode layout
PATHS = ("auto", "gemv", "tiles")
ACTIVATIONS = ("float32", "int8")
_ACTIVATIONS: ContextVar[str] = ContextVar("m0e4_activations", default="float32")
_PATH: ContextVar[str] = ContextVar("m0e4_matmul_path", default="auto")
_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = [_CSRC / "m0e4_gemm.cpp", _CSRC / "decode_step.cpp"]  # one library
_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast"]  # no -march: the source picks its ISA per function

log = logging.getLogger(__name__)


class _Kernel(LazyExtension):
    """The extension, and what this process measured or allocated for it."""

    def __init__(self) -> None:
        super().__init__(
            "quintet_m0e4_ops",
            "quintet_m0e4",
            _SOURCES,
            _CFLAGS,
            ["-fopenmp"],
            DISABLE_ENV,
            "the M0E4 CPU kernel library",
        )
        self.best = 0
        self.vnni = False
        self.bf16 = False
        self.codes: dict[str, int] = {}
        self.float_code: int | None = None  # QUINTET_M0E4_ISA's value -> the kernel's isa code
        self.dtype: torch.dtype | None = None

    def loaded(self, ops: Any) -> None:
        self.best = int(ops.best_isa())
        self.vnni = bool(ops.has_vnni())
        self.bf16 = bool(ops.has_bf16())
        _register_fakes()


_kernel = _Kernel()


def _register_fakes() -> None:
    """Shape functions of the ops, so that symbolic tracing (`quintet.deploy.shapes`) sees through them."""

    @torch.library.register_fake("quintet_m0e4::gemv")
    def _(x, qweight, scales, offsets, group_size, code):
        return x.new_empty(x.shape[0], weight_rows(qweight), dtype=torch.float32)

    @torch.library.register_fake("quintet_m0e4::permute_k")
    def _(x):
        return x.new_empty(x.shape, dtype=torch.float32)

    @torch.library.register_fake("quintet_m0e4::gemv_q8")
    def _(x, qweight, scales, offsets, group_size, code):
        return x.new_empty(x.shape[0], weight_rows(qweight), dtype=torch.float32)

    @torch.library.register_fake("quintet_m0e4::swiglu_gemv")
    def _(x, gu_q, gu_s, gu_o, dn_q, dn_s, dn_o, group_size, code, int8):
        return x.new_empty(x.shape[0], weight_rows(dn_q), dtype=torch.float32)

    @torch.library.register_fake("quintet_m0e4::add_rms_norm")
    def _(x, h, weight, eps):
        return (x if h is None else torch.empty_like(x)), torch.empty_like(x)

    @torch.library.register_fake("quintet_m0e4::swiglu_f32")
    def _(x, w_gu, w_dn, code):
        return x.new_empty(x.shape[0], w_dn.shape[0], dtype=torch.float32)

    @torch.library.register_fake("quintet_m0e4::gemv_f32")
    def _(x, weight, code):
        return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)

    @torch.library.register_fake("quintet_m0e4::matmul_tiles")
    def _(x, qweight, scales, offsets, group_size, code, bf16, small_rows, tile_bytes):
        return x.new_empty(x.shape[0], weight_rows(qweight), dtype=torch.float32)

    @torch.library.register_fake("quintet_m0e4::dequantize_rows")
    def _(qweight, scales, offsets, group_size, row0, out, code):
        return None


def weight_rows(qweight: torch.Tensor) -> int:
    """N of an M0E4 weight's codes in either layout: (N, K/2), or (N/16, K/8, 64) in the decode layout."""
    return qweight.shape[0] * TILE_ROWS if qweight.dim() == 3 else qweight.shape[0]


def to_decode_layout(
    qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (N, K/2) -> (N/16, K/8, 64): byte 4r + b of word w of tile t is byte 4w + b of row 16t + r;
    scales / offsets (N, G) -> (N/16, G, 16). N must be a multiple of 16 and K of 8."""
    n, half = qweight.shape
    g = scales.shape[1]
    t = n // TILE_ROWS
    return (
        qweight.view(t, TILE_ROWS, half // 4, 4).transpose(1, 2).reshape(t, half // 4, 4 * TILE_ROWS),
        scales.view(t, TILE_ROWS, g).transpose(1, 2).contiguous(),
        offsets.view(t, TILE_ROWS, g).transpose(1, 2).contiguous(),
    )


def to_row_layout(
    qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `to_decode_layout` (weights already in the row layout come back as they are)."""
    if qweight.dim() == 2:
        return qweight, scales, offsets
    t, words, _ = qweight.shape
    g = scales.shape[1]
    return (
        qweight.view(t, words, TILE_ROWS, 4).transpose(1, 2).reshape(t * TILE_ROWS, words * 4),
        scales.transpose(1, 2).reshape(t * TILE_ROWS, g),
        offsets.transpose(1, 2).reshape(t * TILE_ROWS, g),
    )


def decode_layout_runs(activations: str) -> bool:
    """True when an engine with these decode activations should hold its weights in the decode layout:
    int8 activations where they run vector code (AVX-512 VNNI or AVX2: the int8 GEMV has its own kernel for
    that layout on both; the other paths read it through a per-tile copy)."""
    return activations == "int8" and int8_activations_available()


def m0e4_kernels_available() -> bool:
    """True when the C++ kernels are built and loaded (builds them on the first call in a fresh cache)."""
    return _kernel.get() is not None


def int8_activations_available() -> bool:
    """True when `activations="int8"` runs integer dot products here: the kernels are loaded and run AVX2
    (vpmaddubsw) or AVX-512 (vpdpbusd where the CPU has VNNI); elsewhere the int8 setting runs the float32
    GEMV."""
    return _kernel.get() is not None and isa() in ("avx2", "avx512")


def isa() -> str:
    """The instruction set the kernels run: the best this CPU has, or lower if `QUINTET_M0E4_ISA` says."""
    if _kernel.get() is None:
        return "pytorch"
    wanted = os.environ.get(ISA_ENV, "").strip().lower()
    if not wanted:
        return ISAS[_kernel.best]
    if wanted not in ISAS:
        raise ValueError(f"{ISA_ENV} = {wanted!r}: must be one of {', '.join(ISAS)}")
    if ISAS.index(wanted) > _kernel.best:
        raise ValueError(f"{ISA_ENV} = {wanted!r}: this CPU runs at most {ISAS[_kernel.best]!r}")
    return wanted


@contextlib.contextmanager
def _setting(var: ContextVar[str], value: str, valid: tuple[str, ...], label: str) -> Iterator[None]:
    if value not in valid:
        raise ValueError(f"{label} = {value!r}: must be one of {', '.join(valid)}")
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def matmul_path(path: str) -> contextlib.AbstractContextManager[None]:
    """Choose the path of every `m0e4_matmul` called inside: "gemv", "tiles" or "auto" (by each call's
    rows). An engine step chooses by its own shape, so that the choice never depends on data (how many
    tokens the router sent to an expert) and a traced step is the step that runs."""
    return _setting(_PATH, path, PATHS, "matmul_path")


def decode_activations(kind: str) -> contextlib.AbstractContextManager[None]:
    """The activations of the decode GEMV inside: "float32" (exact to float32 rounding, the default) or
    "int8" (x quantized per block of 32 to int8 and integer dot products, as llama.cpp's Q4_0 / Q8_0
    matmuls do: about 2x faster here, and the error of 8-bit activations). "int8" needs AVX-512 VNNI
    and K a multiple of 128; elsewhere the float32 GEMV runs."""
    return _setting(_ACTIVATIONS, kind, ACTIVATIONS, "decode activations")


def gemv_max_rows() -> int:
    """Matmuls with at most this many rows of x run the register GEMV; more rows, dequantized tiles."""
    return GEMV_MAX_ROWS


def _time_mm(dtype: torch.dtype) -> float:
    a = torch.randn(256, 512).to(dtype)
    b = torch.randn(256, 512).to(dtype)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        torch.mm(a, b.t())
        best = min(best, time.perf_counter() - t)
    return best


def matmul_dtype() -> torch.dtype:
    """The dtype of the prefill matmuls: float32 or bfloat16, whichever is faster here (measured once,
    a few milliseconds; `QUINTET_MATMUL_DTYPE` overrides)."""
    wanted = os.environ.get(DTYPE_ENV, "").strip().lower()
    if wanted:
        choices = {"float32": torch.float32, "bfloat16": torch.bfloat16}
        if wanted not in choices:
            raise ValueError(f"{DTYPE_ENV} = {wanted!r}: must be float32 or bfloat16")
        return choices[wanted]
    if _kernel.dtype is None:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily(), torch.inference_mode():  # real tensors, even inside a tracer
            f32 = min(_time_mm(torch.float32) for _ in range(2))
            bf16 = min(_time_mm(torch.bfloat16) for _ in range(2))
        _kernel.dtype = torch.bfloat16 if bf16 < 0.8 * f32 else torch.float32
        log.debug("prefill matmuls in %s (fp32 %.2e s, bf16 %.2e s)", _kernel.dtype, f32, bf16)
    return _kernel.dtype


def _tile_rows(n: int, k: int, dtype: torch.dtype) -> int:
    rows = max(16, TILE_BYTES // (k * dtype.itemsize) // 16 * 16)
    return min(rows, n)


def _fallback(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int
) -> torch.Tensor:
    from quintet.kernels.m0e4 import dequantize, unpack_codes

    qweight, scales, offsets = to_row_layout(qweight, scales, offsets)
    n, k = qweight.shape[0], qweight.shape[1] * 2
    x = x.float()
    step = _tile_rows(n, k, torch.float32)
    pieces = []
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        w = dequantize(unpack_codes(qweight[n0:n1]), scales[n0:n1], offsets[n0:n1], group_size)
        pieces.append(F.linear(x, w))
    return torch.cat(pieces, dim=-1) if len(pieces) != 1 else pieces[0]


def _tiles(
    ops: Any,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    group_size: int,
    code: int,
) -> torch.Tensor:
    bf16 = matmul_dtype() == torch.bfloat16
    rows = MICRO_TILE_MAX_ROWS
    if bf16 and code == ISAS.index("avx512") and _kernel.bf16:
        # bfloat16 dot products in our own kernel at every row count: float32 outputs (PyTorch's bfloat16
        # matmul rounds them to bfloat16), and each row's result independent of the other rows
        rows = EVERY_ROW
    return ops.matmul_tiles(x, qweight, scales, offsets, group_size, code, bf16, rows, TILE_BYTES)


def measure_float_gemv() -> None:
    """Measure the float GEMV's instruction set now (at a model's load) rather than at its first call,
    which may be inside a tracer (see `_float_gemv_code`)."""
    if _kernel.get() is not None:
        _float_gemv_code()


def _float_gemv_code() -> int:
    """The float GEMV's instruction set: on a CPU with AVX-512, AVX2 or AVX-512, whichever streams a
    weight from memory faster (measured once per process, ~20 ms: on AMD Zen 4, which runs 512-bit
    operations in two halves, AVX2 reads faster); lower if `QUINTET_M0E4_ISA` says."""
    code = _isa_code()
    if code != 2:
        return code
    if _kernel.float_code is None:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily(), torch.inference_mode():
            w = torch.empty(32768, 512).fill_(0.5)  # 64 MiB: larger than the caches
            x = torch.ones(1, 512)
            best = {}
            for c in (1, 2, 1, 2, 1, 2):
                t = time.perf_counter()
                _kernel.ops.gemv_f32(x, w, c)
                best[c] = min(best.get(c, float("inf")), time.perf_counter() - t)
            del w
        _kernel.float_code = min(best, key=best.get)
    return _kernel.float_code


def _isa_code() -> int:
    """`isa()` as the kernel's code, with the environment read once per distinct value."""
    wanted = os.environ.get(ISA_ENV, "")
    code = _kernel.codes.get(wanted)
    if code is None:
        code = _kernel.codes[wanted] = ISAS.index(isa())
    return code


def _gemv_op(ops: Any, code: int, activations: str, k: int) -> Any:
    """The decode GEMV for inputs of width k: int8 activations where asked and AVX2 or AVX-512 run them."""
    if code >= 1 and activations == "int8" and k % 128 == 0:
        return ops.gemv_q8
    return ops.gemv


def m0e4_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    path: str | None = None,
) -> torch.Tensor:
    """x (..., K) @ W^T (+ bias) with W in M0E4; computed in float32, returned in x's dtype.

    `path`: "auto" (by the number of rows), "gemv" or "tiles"; default: the one `matmul_path` set."""
    path = _PATH.get() if path is None else path
    if path not in PATHS:
        raise ValueError(f"path = {path!r}: must be one of {', '.join(PATHS)}")
    shape = x.shape
    x2 = x if x.dim() == 2 else x.reshape(-1, shape[-1])
    ops = _kernel.get() if x.device.type == "cpu" else None
    if ops is None or (x.requires_grad and torch.is_grad_enabled()):
        if ops is None and x.device.type == "cpu":
            _kernel.warn_fallback("FP4 matmuls dequantize tiles in PyTorch instead (slower)")
        y = _fallback(x2, qweight, scales, offsets, group_size)  # differentiable in x
    else:
        code = _isa_code()
        if path == "gemv" or (path == "auto" and x2.shape[0] <= GEMV_MAX_ROWS):
            gemv = _gemv_op(ops, code, _ACTIVATIONS.get(), shape[-1])
            y = gemv(x2, qweight, scales, offsets, group_size, code)
        else:
            y = _tiles(ops, x2, qweight, scales, offsets, group_size, code)
    if bias is not None:
        y = y + bias
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.view(*shape[:-1], y.shape[-1])


def swiglu_gemv(x: torch.Tensor, gate_up, down) -> torch.Tensor | None:
    """`down(silu(a) * b)`, `[a | b] = gate_up(x)`, in one kernel call where the step runs the GEMV
    (`matmul_path` "gemv"), for two bias-free `M0E4Linear`s or two float32 Linears (anything with
    `weight` and `bias`); else None (the caller runs the three ops)."""
    if (
        _PATH.get() != "gemv"
        or gate_up.bias is not None
        or down.bias is not None
        or x.device.type != "cpu"
        or (x.requires_grad and torch.is_grad_enabled())
    ):
        return None
    ops = _kernel.get()
    if ops is None:
        return None
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if hasattr(gate_up, "qweight") and hasattr(down, "qweight"):
        if gate_up.group_size != down.group_size:
            return None
        y = ops.swiglu_gemv(
            x2, gate_up.qweight, gate_up.scales, gate_up.offsets, down.qweight, down.scales, down.offsets,
            down.group_size, _isa_code(), _ACTIVATIONS.get() == "int8",
        )  # fmt: skip
    elif x.dtype == torch.float32 and gate_up.weight.dtype == down.weight.dtype == torch.float32:
        if (gate_up.weight.requires_grad or down.weight.requires_grad) and torch.is_grad_enabled():
            return None
        y = ops.swiglu_f32(x2, gate_up.weight.contiguous(), down.weight.contiguous(), _float_gemv_code())
    else:
        return None
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.view(*shape[:-1], y.shape[-1])


def fused_add_rms_norm(
    x: torch.Tensor, h: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x + h, RMSNorm(x + h)) (h None: (x, RMSNorm(x))) in one kernel call, for float32 CPU tensors without
    gradients in a decode step (`matmul_path` "gemv"); else None (the caller uses PyTorch's)."""
    if (
        _PATH.get() != "gemv"
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or x.device.type != "cpu"
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        or (h is not None and (h.dtype != torch.float32 or h.shape != x.shape))
        or not x.is_contiguous()
    ):
        return None
    ops = _kernel.get()
    if ops is None:
        return None
    return ops.add_rms_norm(x, None if h is None else h.contiguous(), weight, eps)


def float_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` for a float32 weight, by quintet's GEMV where a step has decode-sized matmuls (the
    `matmul_path` "gemv", or "auto" with at most `GEMV_MAX_ROWS` rows): it streams the weight at the
    memory's speed, which PyTorch's CPU matmul does not reach for one row on every CPU."""
    shape = x.shape
    rows = x.numel() // shape[-1] if shape[-1] else 0
    path = _PATH.get()
    if (
        weight.dtype != torch.float32
        or x.dtype != torch.float32
        or x.device.type != "cpu"
        or path == "tiles"
        or (path == "auto" and rows > GEMV_MAX_ROWS)
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        or not weight.is_contiguous()
    ):
        return F.linear(x, weight, bias)
    ops = _kernel.get()
    if ops is None:
        return F.linear(x, weight, bias)
    y = ops.gemv_f32(x.reshape(-1, shape[-1]), weight, _float_gemv_code())
    if bias is not None:
        y = y + bias
    return y.view(*shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------- bound calls
def decode_binding(activations: str | None = None) -> tuple[Any, int, int, str] | None:
    """What a decode step's bound kernels depend on, read now: (the ops, the M0E4 GEMV's instruction set,
    the float GEMV's, the decode activations: `activations`, or `decode_activations`' setting); None where
    the kernels do not run. A caller that keeps bound calls rebinds when this changes."""
    ops = _kernel.get()
    if ops is None:
        return None
    return ops, _isa_code(), _float_gemv_code(), activations or _ACTIVATIONS.get()
