"""Resumable training checkpoints, one format for every trainer (the LM trainer and the vision trainer).

    OUT/checkpoints/step-000120/
        config.json, model.safetensors, ...   a model folder, loadable on its own (the trainer writes it)
        optimizer.safetensors                 optimizer moments, keyed by parameter name
        trainer_state.json                    step, data position (sampler), history, the run's config,
                                              optimizer param groups
        rng.safetensors                       the RNG states the run draws from
    OUT/checkpoints/latest                    name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed into place, then `latest` is replaced: a run
killed at any moment leaves the previous checkpoint whole. Only safetensors and JSON are read back.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quintet.errors import CheckpointError
from quintet.io import atomic_write_text, read_safetensors, write_safetensors


@dataclass
class Checkpoint:
    """What a checkpoint folder holds, read back."""

    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # {"state": {parameter name: {slot: tensor}}, "param_groups": [...]}
    trainer: dict[str, Any]  # the trainer's own state (step, sampler, history, ...)
    config: dict[str, Any] | None  # the run's config as saved, to refuse resuming a changed run
    rng: dict[str, torch.Tensor]


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run folder, or None when it has none."""
    root = checkpoint_dir(out_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"{pointer}: names {path.name}, which is not a complete checkpoint")
    return path


def _flatten_optimizer(osd: dict[str, Any]) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, state in osd["state"].items():
        for key, value in state.items():
            tensors[f"{name}::{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
    return tensors


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
    step: int,
    write_model: Callable[[Path], None],
    optimizer: dict[str, Any],
    trainer: dict[str, Any],
    rng: dict[str, torch.Tensor],
    config: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write a complete checkpoint atomically and point `latest` at it; keep the newest `keep`.

    `write_model(folder)` writes the model folder; `optimizer` is a state dict keyed by parameter name."""
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_model(tmp)
    write_safetensors(_flatten_optimizer(optimizer), tmp / "optimizer.safetensors")
    write_safetensors(rng, tmp / "rng.safetensors")
    payload = {"trainer": trainer, "config": config, "param_groups": optimizer["param_groups"]}
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


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Everything a checkpoint folder holds (the caller restores the RNG states it saved)."""
    path = Path(path)
    state_path = path / "trainer_state.json"
    try:
        payload = json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{state_path}: not a readable trainer state ({err})") from None
    optimizer = _unflatten_optimizer(
        read_safetensors(path / "optimizer.safetensors"), payload["param_groups"]
    )
    return Checkpoint(
        path=path,
        model_state=read_safetensors(path / "model.safetensors"),
        optimizer=optimizer,
        trainer=payload["trainer"],
        config=payload.get("config"),
        rng=read_safetensors(path / "rng.safetensors"),
    )


def truncate_metrics(path: str | os.PathLike, step: int) -> int:
    """Keep the rows of a metrics JSONL file up to `step` (what the checkpoint a run resumes from had
    seen), drop the later ones and any line a killed writer left half-written; so a resumed run, which
    writes those steps again, never holds a step twice. Returns the number of rows dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += bool(line.strip())
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
            dropped += 1
            continue
        kept.append(line + "\n")
    if dropped:
        atomic_write_text(path, "".join(kept))
    return dropped
