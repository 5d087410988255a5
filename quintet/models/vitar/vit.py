"""The plain ViT baseline (DeiT without distillation), with timm's positional-table resampling.

The learnable table has one entry for CLS and (image_size / patch_size)^2 for the base grid. At any
other token grid the grid part is resampled like timm's `resample_abs_pos_embed`: bicubic,
antialias=True, align_corners=False; CLS keeps its entry. Every patch token goes through the encoder,
so cost grows with the square of the token count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quintet.models.vitar.configuration import ViTConfig
from quintet.models.vitar.model import ImageClassifier


def resample_abs_pos_embed(
    pos_embed: torch.Tensor, new_size: tuple[int, int], old_size: tuple[int, int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """(1, prefix + old_h * old_w, D) -> (1, prefix + new_h * new_w, D), bicubic with antialiasing."""
    if tuple(new_size) == tuple(old_size):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    d = grid.shape[-1]
    grid = grid.float().reshape(1, old_size[0], old_size[1], d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_size), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, d).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


class ViT(ImageClassifier):
    """Plain ViT: patch tokens + resampled learnable PE, CLS, encoder, head."""

    def __init__(self, config: ViTConfig) -> None:
        if not isinstance(config, ViTConfig):
            raise TypeError(f"ViT needs a ViTConfig, got {type(config).__name__}")
        super().__init__(config)
        n = config.base_grid
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n * n, config.hidden_size))
        self._init_weights()
        std = config.initializer_range
        nn.init.trunc_normal_(self.pos_embed, std=std, a=-2 * std, b=2 * std)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(self.normalise(images))
        b, h, w, d = x.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x.reshape(b, h * w, d)], dim=1)
        n = self.config.base_grid
        x = x + resample_abs_pos_embed(self.pos_embed, (h, w), (n, n)).to(x.dtype)
        return self.run_blocks(x)

    def num_tokens(self, height: int, width: int) -> int:
        h, w = self.patch_embed.grid(height, width)
        return 1 + h * w
