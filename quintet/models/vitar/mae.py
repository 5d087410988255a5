"""Masked-autoencoder pre-training for ViTAR (the paper reports ViTAR + MAE; it gives no recipe).

Our reading, since ATM changes what a token is:

- Masking happens on the merged G x G tokens. ATM mixes tokens only inside a cell, so a merged token
  carries information about its own image region only, and hiding it hides that region: ATM can run on
  the whole image without leaking what the encoder is asked to reconstruct.
- The encoder sees CLS + the visible merged tokens; a light decoder (MAE's: linear embed, mask tokens,
  a learnable G x G positional map, transformer blocks) predicts every token.
- The target of a merged token is its image region (the union of the patches ATM merged into it),
  area-resampled to patch_size x patch_size pixels, normalised per token when `norm_pix_loss`. At the
  base resolution this is exactly MAE's patch target. The loss is the mean squared error on masked tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quintet.models.vitar.blocks import Block, init_weights
from quintet.models.vitar.grid_plan import token_spans
from quintet.models.vitar.model import ViTAR


@dataclass
class MAEOutput:
    loss: torch.Tensor  # scalar
    pred: torch.Tensor  # (B, N, p * p * C)
    target: torch.Tensor  # (B, N, p * p * C)
    mask: torch.Tensor  # (B, N) 1 = masked (to reconstruct), 0 = visible


def merged_token_spans(length: int, patch_size: int, grid_size: int, merger: str) -> list[tuple[int, int]]:
    """Pixel [start, end) of each merged token along an axis of `length` pixels (clipped to the image)."""
    n = -(-length // patch_size)
    if merger == "atm":
        spans = token_spans(n, grid_size, patch_size)
    else:
        g = min(n, grid_size)
        spans = [((i * n // g) * patch_size, (-(-(i + 1) * n // g)) * patch_size) for i in range(g)]
    return [(min(a, length - 1), min(b, length)) for a, b in spans]


@functools.lru_cache(maxsize=128)
def _area_matrix(length: int, patch_size: int, grid_size: int, merger: str) -> torch.Tensor:
    """(g * p, length): row t * p + k averages sub-bin k of merged token t's pixel span."""
    spans = merged_token_spans(length, patch_size, grid_size, merger)
    m = np.zeros((len(spans) * patch_size, length), dtype=np.float64)
    pixel = np.arange(length)
    for t, (a, b) in enumerate(spans):
        edges = a + (b - a) * np.arange(patch_size + 1) / patch_size
        for k in range(patch_size):
            lo, hi = edges[k], edges[k + 1]
            overlap = np.clip(np.minimum(pixel + 1, hi) - np.maximum(pixel, lo), 0, None)
            m[t * patch_size + k] = overlap / (hi - lo)
    return torch.from_numpy(m).float()


def region_targets(images: torch.Tensor, patch_size: int, grid_size: int, merger: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, gh * gw, p * p * C): each merged token's region resampled to p x p pixels."""
    b, c, h, w = images.shape
    mh = _area_matrix(h, patch_size, grid_size, merger).to(images)
    mw = _area_matrix(w, patch_size, grid_size, merger).to(images)
    x = torch.einsum("ry,bcyx,sx->bcrs", mh, images, mw)
    gh, gw, p = mh.shape[0] // patch_size, mw.shape[0] // patch_size, patch_size
    x = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, gh * gw, p * p * c)


class MAEDecoder(nn.Module):
    """Linear embed, mask tokens, learnable G x G positional map, transformer blocks, pixel head."""

    def __init__(self, vitar: ViTAR) -> None:
        super().__init__()
        cfg = vitar.config
        d = cfg.decoder_hidden_size
        self.grid_size = cfg.grid_size
        self.embed = nn.Linear(cfg.hidden_size, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_map = nn.Parameter(torch.zeros(1, d, cfg.grid_size, cfg.grid_size))
        self.blocks = nn.ModuleList(
            Block(d, cfg.decoder_num_attention_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.layer_norm_eps)
            for _ in range(cfg.decoder_num_hidden_layers)
        )
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.pred = nn.Linear(d, cfg.patch_size**2 * cfg.num_channels)
        std = cfg.initializer_range
        self.apply(lambda m: init_weights(m, std))
        for p in (self.mask_token, self.pos_map):
            nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)

    def forward(self, encoded: torch.Tensor, restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """encoded (B, 1 + kept, D) in kept order; restore (B, N) puts tokens back; -> (B, N, p * p * C)."""
        x = self.embed(encoded)
        b, n = restore.shape
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(b, n - x.shape[1] + 1, -1)], dim=1)
        tokens = torch.gather(tokens, 1, restore[..., None].expand(-1, -1, x.shape[-1]))
        pos = self.pos_map
        if tuple(grid) != (self.grid_size, self.grid_size):
            pos = F.interpolate(pos, size=tuple(grid), mode="bilinear", align_corners=False)
        tokens = tokens + pos.flatten(2).transpose(1, 2)
        x = torch.cat([x[:, :1], tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]


class ViTARForMaskedImageModeling(nn.Module):
    """ViTAR backbone (`.vitar`, its head unused) + MAE decoder (`.decoder`)."""

    def __init__(self, vitar: ViTAR) -> None:
        super().__init__()
        if not isinstance(vitar, ViTAR):
            raise TypeError(f"MAE pre-training needs a ViTAR backbone, got {type(vitar).__name__}")
        self.vitar = vitar
        self.config = vitar.config
        self.decoder = MAEDecoder(vitar)

    def forward(self, images: torch.Tensor) -> MAEOutput:
        cfg = self.config
        tokens = self.vitar.embed(images)
        b, gh, gw, d = tokens.shape
        n = gh * gw
        keep = max(1, int(round(n * (1 - cfg.mask_ratio))))
        order = torch.rand(b, n, device=images.device).argsort(dim=1)
        restore = order.argsort(dim=1)
        kept = torch.gather(tokens.reshape(b, n, d), 1, order[:, :keep, None].expand(-1, -1, d))
        pred = self.decoder(self.vitar.encode(kept), restore, (gh, gw))
        mask = torch.ones(b, n, device=images.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, restore)
        target = region_targets(images, cfg.patch_size, cfg.grid_size, cfg.merger)
        if cfg.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / torch.sqrt(var + 1e-6)
        per_token = (pred - target).pow(2).mean(-1)
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
        return MAEOutput(loss=loss, pred=pred, target=target, mask=mask)
