"""Vision model folders: `config.json` + `model.safetensors`. Nothing is ever unpickled.

`config.json` carries `model_type` ("vitar" or "vit"), so `load_model` builds the right class.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from quintet.io import atomic_path
from quintet.models.vitar.configuration import ViTARConfig, ViTConfig, load_config
from quintet.models.vitar.model import ImageClassifier, ViTAR
from quintet.models.vitar.vit import ViT

WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A model folder does not hold the tensors its config.json describes."""


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write tensors to a safetensors file atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})


def read_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such safetensors file")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def load_state(
    module: nn.Module, tensors: dict[str, torch.Tensor], source: str, skip: tuple[str, ...] = ()
) -> None:
    """Load `tensors` into `module`, reporting every missing, unexpected or mis-shaped tensor at once.

    Names starting with a prefix in `skip` are ignored on both sides (e.g. a new classification head).
    """
    expected = {k: v for k, v in module.state_dict().items() if not k.startswith(skip)}
    found = {k: v for k, v in tensors.items() if not k.startswith(skip)}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(found) if expected[k].shape != found[k].shape)
    if missing or unexpected or mismatched:
        lines = [f"{source}: the weights do not match the model:"]
        lines += [f"  missing tensor: {k} (expected shape {list(expected[k].shape)})" for k in missing]
        lines += [f"  unexpected tensor: {k} (shape {list(found[k].shape)})" for k in unexpected]
        lines += [
            f"  wrong shape: {k}: found {list(found[k].shape)}, expected {list(expected[k].shape)}"
            for k in mismatched
        ]
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(found, strict=not skip)


def save_pretrained(model: ImageClassifier, directory: str | os.PathLike) -> None:
    """Write `config.json` and `model.safetensors` (atomically, file by file)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(model.state_dict(), directory / WEIGHTS_NAME)
    model.config.save_pretrained(directory)


def build_model(config: ViTARConfig | ViTConfig) -> ViTAR | ViT:
    """A freshly initialised model of the class the config describes."""
    return ViTAR(config) if isinstance(config, ViTARConfig) else ViT(config)


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu") -> ViTAR | ViT:
    """Build the model from `config.json`, load `model.safetensors`; returned in eval mode."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such model folder")
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        if any(directory.glob("*.bin")) or any(directory.glob("*.pt")) or any(directory.glob("*.pth")):
            raise CheckpointError(
                f"{directory}: only pickle weights (*.bin / *.pt / *.pth) found; quintet reads safetensors "
                "only, as pickles can run code"
            )
        raise FileNotFoundError(f"{weights}: no {WEIGHTS_NAME} in the model folder {directory}")
    model = build_model(load_config(directory))
    load_state(model, read_tensors(weights), str(weights))
    return model.to(device).eval()
