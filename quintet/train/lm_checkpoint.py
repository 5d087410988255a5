"""Resumable training checkpoints for the LM trainer.

    OUT/checkpoints/step-000120/
        config.json, generation_config.json, model.safetensors   a model folder: loadable on its own
        optimizer.safetensors                                     AdamW moments, keyed by parameter name
        trainer_state.json                                        step, stage, tokens, data position, groups
        rng.safetensors                                           torch's RNG state
    OUT/checkpoints/latest                                        name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed into place, then `latest` is replaced: a run
killed at any moment leaves the previous checkpoint whole. Only safetensors and JSON are read back.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from quintet.io import atomic_write_text
from quintet.models.jamba.checkpoint import save_state_dict
from quintet.models.jamba.configuration import JambaConfig


@dataclass
class TrainerState:
    step: int = 0
    stage: int = 0  # index of the stage in progress
    stage_tokens: int = 0  # tokens trained in that stage
    total_tokens: int = 0
    sampler: dict[str, Any] | None = None  # data position in the current stage
    history: list[dict[str, Any]] = field(default_factory=list)  # per finished stage: held-out losses


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    root = checkpoint_dir(out_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{pointer}: names {path.name}, which is not a complete checkpoint")
    return path


def _flatten_optimizer(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tensors = {}
    for name, state in osd["state"].items():
        for key, value in state.items():
            tensors[f"{name}::{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
    return tensors, osd["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for flat, value in tensors.items():
        name, key = flat.rsplit("::", 1)
        state.setdefault(name, {})[key] = value
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    out_dir: str | os.PathLike,
    config: JambaConfig,
    model_state: dict[str, torch.Tensor],
    optim_state: dict[str, Any],
    state: TrainerState,
    keep: int = 2,
) -> Path:
    """Write a complete checkpoint atomically and point `latest` at it; keep the newest `keep`."""
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.step:06d}"
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_state_dict(config, model_state, tmp)
    tensors, groups = _flatten_optimizer(optim_state)
    save_file(tensors, str(tmp / "optimizer.safetensors"), metadata={"format": "pt"})
    save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    payload = {"trainer": asdict(state), "param_groups": groups}
    (tmp / "trainer_state.json").write_text(json.dumps(payload, indent=2) + "\n")
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", name + "\n")
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in done[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], TrainerState]:
    """Model state, optimizer state and trainer state of a checkpoint folder (RNG restored in place)."""
    payload = json.loads((path / "trainer_state.json").read_text())
    optim = _unflatten_optimizer(load_file(path / "optimizer.safetensors"), payload["param_groups"])
    model_state = load_file(path / "model.safetensors")
    torch.set_rng_state(load_file(path / "rng.safetensors")["torch"])
    return model_state, optim, TrainerState(**payload["trainer"])
