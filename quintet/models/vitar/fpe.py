"""Fuzzy Positional Encoding (FPE): a learnable G x G map read at jittered token coordinates.

Training: token (i, j) of an h x w grid reads the map at (i + 0.5 + s1, j + 0.5 + s2) in token units,
s1, s2 ~ U[-offset, offset] drawn per token and per image, by bilinear grid sampling (border padding).
Inference (or `offset` = 0): the exact coordinates, which equals bilinear interpolation of the map to
h x w (`interpolate(mode="bilinear", align_corners=False)`); `tests/test_vitar_fpe.py` checks this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def token_grid_coordinates(
    height: int, width: int, offsets: torch.Tensor | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """`grid_sample` coordinates (x, y in [-1, 1], align_corners=False) of the centres of an h x w grid.

    `offsets` (B, h, w, 2) in token units, (dy, dx) per token, are added to the centres.
    Returns (B or 1, h, w, 2) with the last axis ordered (x, y) as grid_sample expects.
    """
    ys = torch.arange(height, device=device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    centres = torch.stack([yy, xx], dim=-1)[None]
    if offsets is not None:
        centres = centres + offsets
    scale = torch.tensor([height, width], device=centres.device, dtype=centres.dtype)
    normalised = 2.0 * centres / scale - 1.0
    return normalised.flip(-1)


class FuzzyPositionalEncoding(nn.Module):
    """Learnable positional map of shape (1, dim, G, G), sampled at each token's (fuzzy) position."""

    def __init__(self, dim: int, grid_size: int, offset: float = 0.5, init_std: float = 0.02) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.offset = offset
        self.pos_map = nn.Parameter(torch.empty(1, dim, grid_size, grid_size))
        nn.init.trunc_normal_(self.pos_map, std=init_std, a=-2 * init_std, b=2 * init_std)

    @property
    def fuzzy(self) -> bool:
        return self.training and self.offset > 0

    def forward(self, batch: int, height: int, width: int) -> torch.Tensor:
        """Positional encodings (B or 1, h, w, dim) for an h x w token grid."""
        if not self.fuzzy:
            return self.interpolate(height, width)
        offsets = torch.empty(batch, height, width, 2, device=self.pos_map.device)
        offsets.uniform_(-self.offset, self.offset)
        return self.sample(token_grid_coordinates(height, width, offsets, device=self.pos_map.device))

    def sample(self, grid: torch.Tensor) -> torch.Tensor:
        """Read the map at `grid_sample` coordinates (B, h, w, 2) -> (B, h, w, dim)."""
        pos_map = self.pos_map.expand(grid.shape[0], -1, -1, -1)
        out = F.grid_sample(
            pos_map, grid.to(pos_map.dtype), mode="bilinear", padding_mode="border", align_corners=False
        )
        return out.permute(0, 2, 3, 1)

    def interpolate(self, height: int, width: int) -> torch.Tensor:
        """The map bilinearly interpolated to h x w: (1, h, w, dim). The inference path."""
        out = F.interpolate(self.pos_map, size=(height, width), mode="bilinear", align_corners=False)
        return out.permute(0, 2, 3, 1)
