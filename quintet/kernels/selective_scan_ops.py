"""The selective scan and its one-token state update as registered PyTorch ops with shape functions, so that
a forward traced on fake tensors (`quintet.deploy.shapes`) sees each as one op of known output shape."""

from __future__ import annotations

import torch

from quintet.kernels import selective_scan_cpu as fused


@torch.library.custom_op("quintet_deploy::selective_scan", mutates_args=())
def selective_scan_op(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor,
    delta_bias: torch.Tensor,
    initial_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`selective_scan_fused(..., delta_softplus=True)`; returns (y, final state)."""
    y, state = fused.selective_scan_fused(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, initial_state=initial_state
    )
    return y.clone() if y is u else y, state


@selective_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state):
    return torch.empty_like(u), u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)


@torch.library.custom_op("quintet_deploy::state_update", mutates_args=())
def state_update_op(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor,
    delta_bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`selective_state_update_fused(..., delta_softplus=True)`; returns (y, new state)."""
    return fused.selective_state_update_fused(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)


@state_update_op.register_fake
def _(state, u, delta, A, B, C, D, z, delta_bias):
    return torch.empty_like(u), torch.empty_like(state)
