"""Operator fusions for CPU inference, each exact or measured (benchmarks/deploy_fusions.py).

- merged projections: q/k/v (and SwiGLU's gate/up) become one Linear with their output rows stacked, one
  matmul instead of three (two). Exact: each output row is computed from its own weights as before, and for
  M0E4 weights the groups run along the input, so stacking rows stacks codes, scales and offsets unchanged.
- SwiGLU: `down(silu(a) * b)` on the two halves of the merged gate/up output.
- residual + RMSNorm: `x = x + h; n = rmsnorm(x)` in one call, normalising with PyTorch's native
  `rms_norm` kernel (one op instead of the five of the eager formula): `EngineRMSNorm` replaces the
  model's norms.
- dequantization inside the matmul: quintet's M0E4 kernels (see `quintet.kernels.m0e4_cpu`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quintet.deploy.qlinear import M0E4Linear
from quintet.kernels.m0e4_cpu import float_linear, fused_add_rms_norm, measure_float_gemv, swiglu_gemv


class EngineLinear(nn.Module):
    """A float `nn.Linear` in the engine: the same weight and bias tensors, decode-sized matmuls through
    quintet's float GEMV (`float_linear`)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return float_linear(x, self.weight, self.bias)


def use_engine_linears(model: nn.Module) -> None:
    """Swap every float `nn.Linear` of `model` for an `EngineLinear` over the same tensors, in place."""
    swapped = False
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, EngineLinear(child))
                swapped = True
    if swapped:
        measure_float_gemv()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm, `weight * (x / sqrt(mean(x^2) + eps))`: one call of quintet's kernel for decode-sized
    float32 inputs, else PyTorch's native kernel.

    Both accumulate in float32 or better whatever the input's dtype and apply the weight before rounding
    to it (Jamba's eager RMSNorm rounds the normalised x first, then multiplies): identical in float32
    up to rounding, within one rounding in bfloat16."""
    fused = fused_add_rms_norm(x, None, weight, eps)
    if fused is not None:
        return fused[1]
    return F.rms_norm(x, (x.shape[-1],), weight if weight.dtype == x.dtype else weight.to(x.dtype), eps)


def add_rms_norm(
    x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + h, rmsnorm(x + h)): the residual add and the next layer norm in one call."""
    fused = fused_add_rms_norm(x, h, weight, eps)
    if fused is not None:
        return fused
    x = x + h
    return x, rms_norm(x, weight, eps)


class EngineRMSNorm(nn.Module):
    """A model's RMSNorm (same weight) through `rms_norm`, and its residual add through `add_rms_norm`."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return add_rms_norm(x, h, self.weight, self.eps)


@torch.no_grad()
def merge_linears(modules: list[nn.Module]) -> nn.Module:
    """One Linear whose output is the concatenation of the outputs of `modules` (same input width)."""
    first = modules[0]
    has_bias = first.bias is not None
    if any((m.bias is not None) != has_bias or m.in_features != first.in_features for m in modules):
        raise ValueError("merge_linears: the modules differ in input width or in having a bias")
    n = sum(m.out_features for m in modules)
    if isinstance(first, M0E4Linear):
        if any(not isinstance(m, M0E4Linear) or m.group_size != first.group_size for m in modules):
            raise ValueError("merge_linears: M0E4 modules must all be M0E4 with the same group_size")
        merged = M0E4Linear(first.in_features, n, first.group_size, bias=has_bias)
        merged.qweight = torch.cat([m.qweight for m in modules])
        merged.scales = torch.cat([m.scales for m in modules])
        merged.offsets = torch.cat([m.offsets for m in modules])
        if has_bias:
            merged.bias = nn.Parameter(torch.cat([m.bias for m in modules]))
        return merged
    if any(not isinstance(m, (nn.Linear, EngineLinear)) for m in modules):
        raise ValueError("merge_linears: expected nn.Linear, EngineLinear or M0E4Linear modules")
    w = first.weight
    merged = nn.Linear(first.in_features, n, bias=has_bias, dtype=w.dtype, device=w.device)
    merged.weight.copy_(torch.cat([m.weight for m in modules]))
    if has_bias:
        merged.bias.copy_(torch.cat([m.bias for m in modules]))
    return merged


class FusedSwiGLU(nn.Module):
    """`down(silu(gate(x)) * up(x))` with gate and up merged into one matmul."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.intermediate = gate_proj.out_features
        self.gate_up_proj = merge_linears([gate_proj, up_proj])
        self.down_proj = down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pair = (self.gate_up_proj, self.down_proj)
        if all(isinstance(m, M0E4Linear) for m in pair) or all(isinstance(m, EngineLinear) for m in pair):
            y = swiglu_gemv(x, *pair)  # decode: one kernel call
            if y is not None:
                return y
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)
