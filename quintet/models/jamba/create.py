"""Create a freshly initialised Jamba model folder from a preset."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from quintet.errors import OutputInUseError
from quintet.io import MODEL_FILES
from quintet.models.jamba.checkpoint import is_weight_file
from quintet.models.jamba.configuration import JambaConfig
from quintet.models.jamba.modeling import JambaForCausalLM


def model_files_in(folder: Path) -> list[str]:
    """The model files (config, weights, tokenizer and generation files) a folder holds, sorted."""
    if not folder.is_dir():
        return []
    names = {"config.json", *MODEL_FILES}
    return sorted(p.name for p in folder.iterdir() if p.name in names or is_weight_file(p.name))


def create_model(
    preset: str,
    out_dir: str | os.PathLike,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    **overrides: Any,
) -> JambaForCausalLM:
    """Build `preset` (with config `overrides`), initialise it from `seed`, save it to `out_dir`.

    A folder that already holds a model (a config.json or weights) is refused unless `overwrite`, which
    first removes its model files (weights, config, tokenizer and generation files), so no file of the old
    model stays beside the new one. A folder with only tokenizer files keeps them (a model assembled
    around its tokenizer).
    """
    out = Path(out_dir)
    found = model_files_in(out)
    model_found = [n for n in found if n == "config.json" or is_weight_file(n)]
    if model_found and not overwrite:
        raise OutputInUseError(
            f"{out}: already holds a model ({', '.join(found)}); pass --overwrite to replace it (its "
            "weights and tokenizer files are removed), or choose another --out"
        )
    if not overwrite:
        found = []
    config = JambaConfig.from_preset(preset, **overrides)
    torch.manual_seed(seed)
    model = JambaForCausalLM(config).to(dtype)
    for name in found:
        (out / name).unlink()
    model.save_pretrained(out)
    return model
