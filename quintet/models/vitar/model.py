"""ViTAR for image classification (arXiv 2403.18361).

images (B, C, H, W), values in [0, 1], any H and W
  -> normalise with config.image_mean / image_std
  -> PatchEmbed                               (B, h, w, D),  h = ceil(H / p)
  -> + Fuzzy Positional Encoding (G x G map)  (B, h, w, D)
  -> Adaptive Token Merger                    (B, G, G, D)   (or smaller when h or w < G)
  -> prepend CLS, transformer blocks, LayerNorm
  -> linear head on CLS                       (B, num_classes)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from quintet.io import write_safetensors
from quintet.models.vitar.atm import AdaptiveTokenMerger, AveragePoolMerger
from quintet.models.vitar.blocks import Block, init_weights
from quintet.models.vitar.configuration import ViTARConfig
from quintet.models.vitar.fpe import FuzzyPositionalEncoding
from quintet.models.vitar.patch_embed import PatchEmbed

WEIGHTS_NAME = "model.safetensors"


class ImageClassifier(nn.Module):
    """What ViTAR and the plain ViT share: pixel normalisation, encoder blocks, final norm and head."""

    def __init__(self, config: ViTARConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.register_buffer(
            "pixel_mean", torch.tensor(config.image_mean).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer("pixel_std", torch.tensor(config.image_std).view(1, -1, 1, 1), persistent=False)
        self.patch_embed = PatchEmbed(config.patch_size, config.num_channels, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers).tolist()
        self.blocks = nn.ModuleList(
            Block(d, config.num_attention_heads, config.mlp_ratio, config.qkv_bias, config.layer_norm_eps, r)
            for r in rates
        )
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.head = nn.Linear(d, config.num_classes)

    def _init_weights(self) -> None:
        std = self.config.initializer_range
        self.apply(lambda m: init_weights(m, std))
        nn.init.trunc_normal_(self.cls_token, std=std, a=-2 * std, b=2 * std)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes) for images (B, C, H, W) with values in [0, 1]."""
        return self.head(self.forward_features(images)[:, 0])

    def num_tokens(self, height: int, width: int) -> int:
        """Tokens the transformer encoder sees for an image of height x width pixels (CLS included)."""
        raise NotImplementedError

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `config.json` and `model.safetensors` (each through a temporary name)."""
        write_safetensors(self.state_dict(), Path(directory) / WEIGHTS_NAME)
        self.config.save_pretrained(directory)


class ViTAR(ImageClassifier):
    """ViTAR: any-resolution ViT with FPE and the Adaptive Token Merger."""

    def __init__(self, config: ViTARConfig) -> None:
        if not isinstance(config, ViTARConfig):
            raise TypeError(f"ViTAR needs a ViTARConfig, got {type(config).__name__}")
        super().__init__(config)
        d = config.hidden_size
        offset = config.fpe_offset if config.pos_embed == "fpe" else 0.0
        self.pos_embed = FuzzyPositionalEncoding(d, config.grid_size, offset, config.initializer_range)
        if config.merger == "atm":
            self.merger: nn.Module = AdaptiveTokenMerger(
                d,
                config.grid_size,
                config.num_attention_heads,
                config.mlp_ratio,
                config.qkv_bias,
                config.layer_norm_eps,
            )
        else:
            self.merger = AveragePoolMerger(config.grid_size)
        self._init_weights()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens + FPE, merged: (B, gh, gw, D) with gh, gw = G when the input is large enough."""
        x = self.patch_embed(self.normalise(images))
        b, h, w, _ = x.shape
        x = x + self.pos_embed(b, h, w).to(x.dtype)
        return self.merger(x)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prepend CLS to (B, N, D) tokens, run the encoder: (B, 1 + N, D)."""
        cls = self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        return self.run_blocks(torch.cat([cls, tokens], dim=1))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(self.embed(images).flatten(1, 2))

    def merged_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid after the merger for an image of height x width pixels."""
        h, w = self.patch_embed.grid(height, width)
        g = self.config.grid_size
        return min(h, g), min(w, g)

    def num_passes(self, height: int, width: int) -> int:
        """ATM passes for an image of height x width pixels."""
        return self.merger.num_passes(*self.patch_embed.grid(height, width))

    def num_tokens(self, height: int, width: int) -> int:
        gh, gw = self.merged_grid(height, width)
        return 1 + gh * gw
