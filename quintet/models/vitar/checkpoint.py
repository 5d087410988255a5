"""Vision model folders: `config.json` + `model.safetensors`. Nothing is ever unpickled.

`config.json` carries `model_type` ("vitar" or "vit"), so `load_model` builds the right class.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from quintet.errors import CheckpointError
from quintet.io import read_safetensors, tensor_mismatches
from quintet.models.vitar.configuration import ViTARConfig, ViTConfig, load_config
from quintet.models.vitar.model import WEIGHTS_NAME, ViTAR
from quintet.models.vitar.vit import ViT


def load_state(
    module: nn.Module, tensors: dict[str, torch.Tensor], source: str, skip: tuple[str, ...] = ()
) -> None:
    """Load `tensors` into `module`, reporting every missing, unexpected or mis-shaped tensor at once.

    Names starting with a prefix in `skip` are ignored on both sides (e.g. a new classification head).
    """
    expected = {k: v for k, v in module.state_dict().items() if not k.startswith(skip)}
    found = {k: v for k, v in tensors.items() if not k.startswith(skip)}
    lines = tensor_mismatches(
        {k: v.shape for k, v in expected.items()}, {k: v.shape for k, v in found.items()}
    )
    if lines:
        raise CheckpointError("\n".join([f"{source}: the weights do not match the model:", *lines]))
    module.load_state_dict(found, strict=not skip)


def build_model(config: ViTARConfig | ViTConfig) -> ViTAR | ViT:
    """A freshly initialised model of the class the config describes."""
    return ViTAR(config) if isinstance(config, ViTARConfig) else ViT(config)


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu") -> ViTAR | ViT:
    """Build the model from `config.json`, load `model.safetensors`; returned in eval mode."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such model folder")
    weights = directory / WEIGHTS_NAME
    model = build_model(load_config(directory))
    load_state(model, read_safetensors(weights), str(weights))
    return model.to(device).eval()
