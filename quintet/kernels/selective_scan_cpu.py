"""The selective scan fused into one C++ loop for CPU: forward, backward (autograd) and the decode step.

Same shapes, math and results as `quintet.kernels.selective_scan` (b = batch, d = channels,
L = length, n = state size):

    u, delta, z : (b, d, L)      A : (d, n)      B, C : (b, n, L)      D, delta_bias : (d,)
    initial_state, final state : (b, d, n), float32 (float64 when u is float64)

    dt_t = softplus(delta_t + delta_bias);  h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t;
    y_t  = (C_t . h_t + D u_t) * silu(z_t)

The kernel (`csrc/selective_scan.cpp`) walks time once, computing the discretisation inside the loop,
for blocks of 16 channels at a time (vectorised across channels), keeps the state in float32 (float64
for float64 inputs), splits the blocks of batch x channels over `torch.get_num_threads()` threads and
never builds a (b, d, L, n) tensor. Training saves the state every 32 steps; the backward pass recomputes
one 32-step chunk at a time from those checkpoints and walks it in reverse. Inputs of other floating
dtypes are computed in float32; y is returned in u's dtype. The backward pass is not itself
differentiable (no double backward). See docs/kernels.md for the design and the measurements.

The extension is compiled on first use by `quintet.kernels.build.load_extension` (needs a C++ compiler
and `ninja`; 10-30 s) into a cache folder, `$QUINTET_EXTENSIONS_DIR` or `~/.cache/quintet/extensions`,
keyed by the source, flags, torch, Python, CPU and virtualenv, so later processes load it in milliseconds.
If it cannot be built, or `QUINTET_DISABLE_FUSED_SCAN=1` is set, the functions here warn once and
run the plain PyTorch implementations instead. Tensors on other devices always take the PyTorch path.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from quintet.kernels.build import LazyExtension
from quintet.kernels.selective_scan import selective_scan, selective_state_update

__all__ = [
    "fused_scan_available",
    "causal_conv1d_silu_fused",
    "inference_kernels_available",
    "mamba_mixer_step_fused",
    "selective_scan_fused",
    "selective_state_update_fused",
]

DISABLE_ENV = "QUINTET_DISABLE_FUSED_SCAN"
_SOURCE = Path(__file__).resolve().parent / "csrc" / "selective_scan.cpp"
_CHUNK = 32  # steps between saved states; must equal kChunk in the C++ source
_LANES = 16  # channels per block; must equal kLanes in the C++ source
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]

log = logging.getLogger(__name__)


_loader = LazyExtension(
    "quintet_scan_ops",
    "quintet_scan",
    [_SOURCE],
    _CFLAGS,
    ["-fopenmp"],
    DISABLE_ENV,
    "the fused CPU selective scan",
)


def fused_scan_available() -> bool:
    """True when the fused kernel is built and loaded (compiles it on the first call in a fresh cache)."""
    return _loader.get() is not None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)  # .to() costs a dispatch even when a no-op


def _contig(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    return t.to(dtype).contiguous()


def _scan_forward(
    ops: Any,
    args: tuple[torch.Tensor | None, ...],
    delta_softplus: bool,
    initial_state: torch.Tensor | None,
    save_checkpoints: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Runs the kernel on prepared arguments: returns (y, final_state, checkpoints) in the compute dtype."""
    u, delta, A, Bt, Ct, D, z, bias = args
    b, d, L = u.shape
    n = A.shape[1]
    y = u.new_empty((b, d, L))
    h_last = u.new_empty((b, d, n))
    ckpt = u.new_empty((b, d, -(-L // _CHUNK), n)) if save_checkpoints else None
    ops.scan_fwd(u, delta, A, Bt, Ct, D, z, bias, delta_softplus, initial_state, y, h_last, ckpt)
    return y, h_last, ckpt


def _prepare(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
) -> tuple[torch.Tensor | None, ...]:
    """Casts to the compute dtype; B and C become time-major (b, L, n) (free when they are views of that)."""
    dtype = _compute_dtype(u.dtype)
    if u.dim() != 3 or B.dim() != 3 or C.dim() != 3:
        raise ValueError(f"u, B, C must be 3-D (b, d, L) / (b, n, L); got {u.shape}, {B.shape}, {C.shape}")
    Bt = _contig(B.transpose(1, 2), dtype)
    Ct = _contig(C.transpose(1, 2), dtype)
    return (
        _cast(u, dtype),
        _cast(delta, dtype),
        _contig(A, dtype),
        Bt,
        Ct,
        _contig(D, dtype),
        _cast(z, dtype),
        _contig(delta_bias, dtype),
    )


class _FusedScan(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor | None,
        z: torch.Tensor | None,
        delta_bias: torch.Tensor | None,
        delta_softplus: bool,
        initial_state: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ops = _loader.get()
        args = _prepare(u, delta, A, B, C, D, z, delta_bias)
        h0 = _contig(initial_state, args[0].dtype)
        y, h_last, ckpt = _scan_forward(ops, args, delta_softplus, h0, save_checkpoints=True)
        ctx.save_for_backward(*args, ckpt)
        ctx.delta_softplus = delta_softplus
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (u, delta, A, B, C, D, z, delta_bias))
        ctx.state_dtype = None if initial_state is None else initial_state.dtype
        return _cast(y, u.dtype), h_last

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_y: torch.Tensor, grad_h_last: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        u, delta, A, Bt, Ct, D, z, bias, ckpt = ctx.saved_tensors
        dtype = u.dtype
        b, d, L = u.shape
        n = A.shape[1]
        groups = max(1, min(-(-d // _LANES), torch.get_num_threads()))  # tasks per batch row
        grad_u = u.new_empty((b, d, L))
        grad_delta = u.new_empty((b, d, L))
        grad_z = u.new_empty((b, d, L)) if z is not None else None
        grad_A = u.new_empty((b, d, n))
        grad_B = u.new_empty((b, groups, L, n))
        grad_C = u.new_empty((b, groups, L, n))
        grad_D = u.new_empty((b, d))
        grad_bias = u.new_empty((b, d))
        grad_h0 = u.new_empty((b, d, n))
        _loader.get().scan_bwd(
            u, delta, A, Bt, Ct, D, z, bias, ctx.delta_softplus, ckpt,
            grad_y.to(dtype), grad_h_last.to(dtype).contiguous(),
            grad_u, grad_delta, grad_z, grad_A, grad_B, grad_C, grad_D, grad_bias, grad_h0,
        )  # fmt: skip
        du, ddelta, dA, dB, dC, dD, dz, dbias = ctx.dtypes
        needs = ctx.needs_input_grad
        return (
            grad_u.to(du) if needs[0] else None,
            grad_delta.to(ddelta) if needs[1] else None,
            grad_A.sum(0).to(dA) if needs[2] else None,
            grad_B.sum(1).transpose(1, 2).to(dB) if needs[3] else None,
            grad_C.sum(1).transpose(1, 2).to(dC) if needs[4] else None,
            grad_D.sum(0).to(dD) if needs[5] else None,
            grad_z.to(dz) if needs[6] else None,
            grad_bias.sum(0).to(dbias) if needs[7] else None,
            None,
            grad_h0.to(ctx.state_dtype) if needs[9] else None,
        )


def selective_scan_fused(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective scan in one fused CPU kernel: returns `(y, final_state)`, differentiable.

    Shapes: u, delta, z (b, d, L); A (d, n); B, C (b, n, L); D, delta_bias (d,); initial_state (b, d, n).
    y has u's dtype and shape; final_state is (b, d, n) in float32 (float64 for float64 u). Any strides
    are accepted (B and C laid out as (b, L, n) in memory cost no copy). Drop-in for
    `quintet.kernels.selective_scan.selective_scan`, which it runs instead (warning once) when the
    kernel is unavailable, and always for tensors that are not on the CPU.
    """
    if u.device.type != "cpu":
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    ops = _loader.get()
    if ops is None:
        _loader.warn_fallback("using the PyTorch implementation")
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _FusedScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    args = _prepare(u, delta, A, B, C, D, z, delta_bias)
    h0 = _contig(initial_state, args[0].dtype)
    y, h_last, _ = _scan_forward(ops, args, delta_softplus, h0, save_checkpoints=False)
    return _cast(y, u.dtype), h_last


def selective_state_update_fused(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step in one fused CPU kernel: returns `(y, new_state)`; `state` is not modified.

    Shapes: state (b, d, n) float32/float64; u, delta, z (b, d); A (d, n); B, C (b, n); D, delta_bias (d,).
    y has u's dtype, new_state has state's dtype. Inference only: when autograd needs a gradient, and for
    tensors not on the CPU, it runs `quintet.kernels.selective_scan.selective_state_update`.
    """
    tensors = (state, u, delta, A, B, C, D, z, delta_bias)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    ops = None if needs_grad or state.device.type != "cpu" else _loader.get()
    if ops is None:
        if not needs_grad and state.device.type == "cpu":
            _loader.warn_fallback("using the PyTorch implementation")
        return selective_state_update(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    dtype = state.dtype
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"state must be float32 or float64, got {dtype}")
    state_c = state.contiguous()
    y = torch.empty(state.shape[:2], dtype=dtype)
    out = torch.empty_like(state_c)
    inputs = (_cast(u, dtype), _cast(delta, dtype), *(_contig(t, dtype) for t in (A, B, C, D)))
    ops.state_update(state_c, *inputs, _cast(z, dtype), _contig(delta_bias, dtype), delta_softplus, y, out)
    return _cast(y, u.dtype), out


def inference_kernels_available(*tensors: torch.Tensor) -> bool:
    """True when the inference-only kernels (`mamba_mixer_step_fused`, `causal_conv1d_silu_fused`) can run
    on these tensors: the extension is loaded, they are all on the CPU in one dtype (float32 or float64),
    and autograd needs no gradient through them."""
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.float64):
        return False
    if any(t.device.type != "cpu" or t.dtype != dtype for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return _loader.get() is not None


def mamba_mixer_step_fused(
    xz: torch.Tensor,
    conv_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    dt_norm_weight: torch.Tensor,
    b_norm_weight: torch.Tensor,
    c_norm_weight: torch.Tensor,
    eps: float,
    dt_proj_weight: torch.Tensor,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor | None,
    ssm_state: torch.Tensor,
    A: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Jamba Mamba mixer's work for one token between `in_proj` and `out_proj`, in one kernel call.

    `A`: -exp(A_log), if the caller keeps it (an engine computes it once; else it is computed here).

    xz (b, 2 d) is in_proj's output; conv_state (b, d, d_conv - 1) and ssm_state (b, d, n) are the
    cached states (not modified). Returns `(y, new_conv_state, new_ssm_state)`, y (b, d) gated by
    silu(z), ready for out_proj. conv_weight is the depthwise Conv1d weight (d, 1, d_conv) or (d, d_conv).
    Inference only; check `inference_kernels_available` first (the caller keeps the PyTorch path otherwise).
    """
    ops = _loader.get()
    b, two_d = xz.shape
    d = two_d // 2
    y = xz.new_empty((b, d))
    new_conv = conv_state.new_empty(conv_state.shape)
    new_ssm = ssm_state.new_empty(ssm_state.shape)
    ops.mixer_step(
        xz.contiguous(), conv_state.contiguous(), conv_weight.reshape(d, -1).contiguous(), conv_bias,
        x_proj_weight.contiguous(), dt_norm_weight, b_norm_weight, c_norm_weight, float(eps),
        dt_proj_weight.contiguous(), dt_bias, (-torch.exp(A_log) if A is None else A).contiguous(), D,
        ssm_state.contiguous(), y, new_conv, new_ssm,
    )  # fmt: skip
    return y, new_conv, new_ssm


def causal_conv1d_silu_fused(
    x: torch.Tensor,
    conv_state: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(causal depthwise conv1d) of x (b, L, d) continuing from conv_state (b, d, K - 1) (zeros when
    None), in x's (b, L, d) layout. Returns `(out (b, L, d) contiguous, new_conv_state (b, d, K - 1))`, the
    state being the last K - 1 inputs (older state included when L < K - 1). `weight` is the Conv1d weight
    (d, 1, K) or (d, K). Inference only; check `inference_kernels_available` first."""
    b, L, d = x.shape
    w = weight.reshape(d, -1).contiguous()
    if x.stride(2) != 1:
        x = x.contiguous()
    out = x.new_empty((b, L, d))
    new_state = x.new_empty((b, d, w.shape[1] - 1))
    state = None if conv_state is None else conv_state.contiguous()
    _loader.get().causal_conv(x, state, w, bias, silu, out, new_state)
    return out, new_state
