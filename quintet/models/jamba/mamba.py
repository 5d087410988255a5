"""The Mamba mixer of a Jamba layer (with Jamba's RMSNorm on dt, B and C).

    x, z      = in_proj(h).chunk(2)                  x: the SSM input, z: the gate
    x         = silu(causal depthwise conv1d(x))
    dt, B, C  = split(x_proj(x), [dt_rank, d_state, d_state]);  RMSNorm each (dt before dt_proj)
    dt        = softplus(dt_proj(dt))                 (bias added inside the scan, in float32)
    y         = selective_scan(x, dt, A = -exp(A_log), B, C, D, gate z)   (the fused CPU kernel, see
                                                                        quintet.kernels; PyTorch elsewhere)
    out       = out_proj(y)

With a cache the conv and SSM states carry over from the previous call, so a prompt can be fed in any
number of pieces (one token at a time uses the O(1) recurrent step) and gives the same result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quintet.kernels import selective_scan_cpu as fused
from quintet.kernels import selective_scan_ops
from quintet.models.jamba.cache import HybridCache
from quintet.models.jamba.configuration import JambaConfig
from quintet.models.jamba.norm import RMSNorm
from quintet.models.jamba.numerics import inference_paths
from quintet.models.jamba.tracing import current_trace


class JambaMambaMixer(nn.Module):
    def __init__(self, config: JambaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        d_inner = config.mamba_d_inner
        self.d_inner = d_inner
        self.d_state = config.mamba_d_state
        self.d_conv = config.mamba_d_conv
        self.dt_rank = config.mamba_dt_rank
        self.in_proj = nn.Linear(config.hidden_size, 2 * d_inner, bias=config.mamba_proj_bias)
        self.conv1d = nn.Conv1d(
            d_inner,
            d_inner,
            kernel_size=self.d_conv,
            groups=d_inner,
            bias=config.mamba_conv_bias,
            padding=self.d_conv - 1,
        )
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).expand(d_inner, -1)
        self.A_log = nn.Parameter(torch.log(A).contiguous())
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, config.hidden_size, bias=config.mamba_proj_bias)
        self.dt_layernorm = RMSNorm(self.dt_rank, eps=config.rms_norm_eps)
        self.b_layernorm = RMSNorm(self.d_state, eps=config.rms_norm_eps)
        self.c_layernorm = RMSNorm(self.d_state, eps=config.rms_norm_eps)
        self.register_buffer("frozen_A", None, persistent=False)
        self._frozen_step: tuple | None = None

    @torch.no_grad()
    def freeze(self) -> None:
        """For inference (the deploy engine): compute A = -exp(A_log) once instead of at every step. The
        weights must not change afterwards."""
        self.frozen_A = -torch.exp(self.A_log.detach().float())
        self._frozen_step = None  # the fused step's weight arguments, bound at the first step

    def _A(self) -> torch.Tensor:
        return self.frozen_A.float() if self.frozen_A is not None else -torch.exp(self.A_log.float())

    def forward(
        self, h: torch.Tensor, token_mask: torch.Tensor | None = None, cache: HybridCache | None = None
    ) -> torch.Tensor:
        """h: (b, L, hidden). token_mask: (b, L), 1 for real tokens, 0 for (left) padding, or None.

        Padding positions feed zeros into the convolution and the scan, so the state a padded row
        reaches is exactly the state of its unpadded prompt.
        """
        b, L, _ = h.shape
        trace = current_trace()
        if L == 1 and cache is not None and trace is None and (token_mask is None or bool(token_mask.all())):
            out = self._fused_step(h, cache)
            if out is not None:
                return out
        x, z = self.in_proj(h).chunk(2, dim=-1)  # (b, L, d_inner) each
        if token_mask is not None:
            x = x * token_mask.unsqueeze(-1).to(x.dtype)
        conv_state, ssm_state = cache.mamba_state(self.layer_idx) if cache is not None else (None, None)
        x, conv_state = self._causal_conv_silu(x, conv_state)
        if token_mask is not None:
            x = x * token_mask.unsqueeze(-1).to(x.dtype)

        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], -1)
        x = x.transpose(1, 2)  # (b, d_inner, L), a view: the scan reads any strides
        dt = F.linear(self.dt_layernorm(dt), self.dt_proj.weight).transpose(1, 2)  # (b, d, L); bias: in scan
        B = self.b_layernorm(B)
        C = self.c_layernorm(C)
        A, bias, D = self._A(), self.dt_proj.bias.float(), self.D.float()
        if L == 1 and ssm_state is not None:
            args = (ssm_state, x[..., 0], dt[..., 0], A, B[:, 0], C[:, 0], D, z[:, 0], bias)
            if trace is not None:
                y, new_state = selective_scan_ops.state_update_op(*args)
            else:
                y, new_state = fused.selective_state_update_fused(*args, delta_softplus=True)
            y = y.unsqueeze(1)
        else:
            args = (x, dt, A, B.transpose(1, 2), C.transpose(1, 2), D, z.transpose(1, 2), bias)
            if trace is not None:
                y, new_state = selective_scan_ops.selective_scan_op(*args, ssm_state)
            else:
                y, new_state = fused.selective_scan_fused(*args, delta_softplus=True, initial_state=ssm_state)
            y = y.transpose(1, 2)
        if cache is not None:
            cache.set_mamba_state(self.layer_idx, conv_state, new_state)
        return self.out_proj(y)

    def _causal_conv_silu(
        self, x: torch.Tensor, conv_state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """silu(causal depthwise conv) of x (b, L, d_inner), continuing from conv_state
        (b, d_inner, d_conv - 1) or zeros. Returns the output in x's layout and the new conv state (the
        last d_conv - 1 inputs)."""
        weights = (
            (self.conv1d.weight,) if self.conv1d.bias is None else (self.conv1d.weight, self.conv1d.bias)
        )
        state = () if conv_state is None else (conv_state,)
        if (
            current_trace() is None
            and inference_paths()
            and fused.inference_kernels_available(x, *weights, *state)
        ):
            return fused.causal_conv1d_silu_fused(x, conv_state, self.conv1d.weight, self.conv1d.bias)
        b, L, _ = x.shape
        x = x.transpose(1, 2)  # (b, d_inner, L)
        if conv_state is None:
            conv_state = x.new_zeros(b, self.d_inner, self.d_conv - 1)
        window = torch.cat([conv_state.to(x.dtype), x], dim=-1)  # (b, d_inner, d_conv - 1 + L)
        if L == 1:  # one token: a dot product per channel (oneDNN's conv has a large fixed cost)
            x = torch.einsum("bdk,dk->bd", window, self.conv1d.weight[:, 0]).unsqueeze(-1)
            x = x if self.conv1d.bias is None else x + self.conv1d.bias.unsqueeze(-1)
        else:
            x = F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)
        return F.silu(x).transpose(1, 2), window[..., window.shape[-1] - (self.d_conv - 1) :]

    def _step_weights(self, h: torch.Tensor) -> tuple | None:
        """The fused step's weight arguments (conv weight .. D, after the states' slot), or None where the
        kernel cannot take them (4-bit x_proj codes, several eps, another dtype, autograd on). A frozen
        mixer's weights never change, so its tuple is built once, at the first step."""
        if self.frozen_A is not None and self._frozen_step is not None:
            return self._frozen_step[0]
        x_proj_weight = getattr(self.x_proj, "weight", None)  # none when x_proj holds 4-bit codes
        eps = {self.dt_layernorm.eps, self.b_layernorm.eps, self.c_layernorm.eps}
        if not isinstance(x_proj_weight, torch.Tensor) or len(eps) != 1:  # the kernel has one eps
            return None
        weights = (
            self.conv1d.weight,
            x_proj_weight,
            self.dt_layernorm.weight,
            self.b_layernorm.weight,
            self.c_layernorm.weight,
            self.dt_proj.weight,
            self.dt_proj.bias,
            self.A_log,
            self.D,
        )
        if not fused.inference_kernels_available(h, *weights):
            return None
        d = self.d_inner
        args = (
            self.conv1d.weight.reshape(d, -1).contiguous(),
            self.conv1d.bias,
            x_proj_weight.contiguous(),
            self.dt_layernorm.weight,
            self.b_layernorm.weight,
            self.c_layernorm.weight,
            self.dt_layernorm.eps,
            self.dt_proj.weight.contiguous(),
            self.dt_proj.bias,
            self.A_log,
            self.D,
        )
        if self.frozen_A is not None:
            self._frozen_step = (args,)
        return args

    def _fused_step(self, h: torch.Tensor, cache: HybridCache) -> torch.Tensor | None:
        """One cached token through the fused mixer step (quintet.kernels), or None where it cannot run
        (no state yet, autograd on, another dtype or device, or the kernel is unavailable)."""
        conv_state, ssm_state = cache.mamba_state(self.layer_idx)
        if conv_state is None or ssm_state is None:
            return None
        args = self._step_weights(h)
        if args is None or not fused.inference_kernels_available(h, conv_state, ssm_state):
            return None
        xz = self.in_proj(h[:, 0])
        y, conv_state, ssm_state = fused.mamba_mixer_step_fused(
            xz, conv_state, *args, ssm_state, A=self.frozen_A
        )
        cache.set_mamba_state(self.layer_idx, conv_state, ssm_state)
        return self.out_proj(y).unsqueeze(1)
