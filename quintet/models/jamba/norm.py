"""RMSNorm, computed in float32 whatever the activation dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """`weight * x / sqrt(mean(x^2) + eps)` over the last dimension."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype in (torch.float32, torch.float64) and self.weight.dtype == dtype:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one op: same math, less overhead
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_and_norm(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add and this norm: `(x + h, norm(x + h))` (one fused call in the deploy engine)."""
        x = x + h
        return x, self(x)
