"""The Mamba selective scan: the path the model uses, a one-token step, and a slow reference.

Shape contract (the layout of `mamba_ssm.selective_scan_fn`), b = batch, d = channels (d_inner),
L = length, n = state size:

    u, delta, z : (b, d, L)      A : (d, n)      B, C : (b, n, L)      D, delta_bias : (d,)
    initial_state, final state : (b, d, n), float32 (float64 when the inputs are float64)

Math, per channel and time step (zero-order hold for A, Euler for B, as in Mamba):

    dt_t = softplus(delta_t + delta_bias)          (softplus and bias optional)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t
    y_t  = C_t . h_t + D * u_t,    then   y_t *= silu(z_t)

The state is always kept in float32 or wider, whatever the dtype of the activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _discretise_delta(delta: torch.Tensor, delta_bias: torch.Tensor | None, softplus: bool) -> torch.Tensor:
    """delta: (b, d, L) or (b, d); delta_bias: (d,)."""
    if delta_bias is not None:
        bias = delta_bias.to(delta.dtype)
        delta = delta + (bias.unsqueeze(-1) if delta.dim() == 3 else bias)
    return F.softplus(delta) if softplus else delta


def _finish(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    """The skip term and the gate: y + D * u, times silu(z); u is (b, d, L) or one step (b, d)."""
    if D is not None:
        D = D.to(y.dtype)
        y = y + (D.unsqueeze(-1) if u.dim() == 3 else D) * u
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def selective_scan(
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
    """The scan the model runs: returns `(y, final_state)`; differentiable through autograd.

    A time loop with the discretisation computed inside it, on time-major contiguous slices, so no
    (b, d, L, n) tensor is ever materialised.
    """
    out_dtype = u.dtype
    dtype = _state_dtype(u.dtype)
    b, d, L = u.shape
    delta = _discretise_delta(delta.to(dtype), delta_bias, delta_softplus)
    u32 = u.to(dtype)
    A = A.to(dtype)
    delta_t = delta.permute(2, 0, 1).contiguous()  # (L, b, d)
    du_t = (delta * u32).permute(2, 0, 1).contiguous()  # (L, b, d)
    B_t = B.to(dtype).permute(2, 0, 1).unsqueeze(2).contiguous()  # (L, b, 1, n)
    C_t = C.to(dtype).permute(2, 0, 1).unsqueeze(-1).contiguous()  # (L, b, n, 1)
    h = u.new_zeros((b, d, A.shape[1]), dtype=dtype) if initial_state is None else initial_state.to(dtype)
    ys = []
    for t in range(L):
        h = torch.exp(delta_t[t].unsqueeze(-1) * A) * h + du_t[t].unsqueeze(-1) * B_t[t]
        ys.append(torch.bmm(h, C_t[t]).squeeze(-1))
    y = torch.stack(ys, dim=-1) if ys else u32.new_zeros((b, d, 0))
    return _finish(y, u32, D, z).to(out_dtype), h


def selective_state_update(
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
    """One recurrent step, O(1) in the context length: returns `(y, new_state)`.

    Shapes: state (b, d, n); u, delta, z (b, d); B, C (b, n). Equal to `selective_scan` with L = 1.
    """
    dtype = state.dtype
    dt = _discretise_delta(delta.to(dtype), delta_bias, delta_softplus)
    u32 = u.to(dtype)
    new_state = torch.exp(dt.unsqueeze(-1) * A.to(dtype)) * state + (dt * u32).unsqueeze(-1) * B.to(
        dtype
    ).unsqueeze(1)
    y = torch.bmm(new_state, C.to(dtype).unsqueeze(-1)).squeeze(-1)
    return _finish(y, u32, D, z).to(u.dtype), new_state


def selective_scan_ref(
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
    """The definition, written for reading, not speed: an explicit loop over batch, channel and time.

    Only for tests on small sizes; compare the fast paths against it (in float64 for gradients).
    """
    dtype = _state_dtype(u.dtype)
    b, d, L = u.shape
    n = A.shape[1]
    dt_all = _discretise_delta(delta.to(dtype), delta_bias, delta_softplus)
    state = u.new_zeros((b, d, n), dtype=dtype) if initial_state is None else initial_state.to(dtype)
    rows_y, rows_h = [], []
    for i in range(b):
        chan_y, chan_h = [], []
        for c in range(d):
            h = state[i, c]
            y_c = []
            for t in range(L):
                dt = dt_all[i, c, t]
                h = torch.exp(dt * A[c].to(dtype)) * h + dt * B[i, :, t].to(dtype) * u[i, c, t].to(dtype)
                y_c.append((C[i, :, t].to(dtype) * h).sum())
            chan_y.append(torch.stack(y_c) if y_c else u.new_zeros(0, dtype=dtype))
            chan_h.append(h)
        rows_y.append(torch.stack(chan_y))
        rows_h.append(torch.stack(chan_h))
    y = torch.stack(rows_y)
    return _finish(y, u.to(dtype), D, z).to(u.dtype), torch.stack(rows_h)
