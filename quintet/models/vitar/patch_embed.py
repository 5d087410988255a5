"""Patch embedding: a strided convolution that turns an image into a grid of tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, ceil(H / p), ceil(W / p), dim).

    Any image size works: a side that is not a multiple of the patch size is zero-padded on the
    right/bottom (timm's `dynamic_img_pad`), so no pixel is dropped.
    """

    def __init__(self, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Tokens per side for an image of height x width pixels."""
        p = self.patch_size
        return -(-height // p), -(-width // p)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"PatchEmbed: expected images of shape (batch, {self.in_channels}, height, width), "
                f"got {tuple(images.shape)}"
            )
        p = self.patch_size
        pad_h, pad_w = -images.shape[2] % p, -images.shape[3] % p
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        return self.proj(images).permute(0, 2, 3, 1)
