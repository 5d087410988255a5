"""Create a freshly initialised Jamba model folder from a preset."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from quintet.models.jamba.configuration import JambaConfig
from quintet.models.jamba.modeling import JambaForCausalLM


def create_model(
    preset: str,
    out_dir: str | os.PathLike,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> JambaForCausalLM:
    """Build `preset` (with config `overrides`), initialise it from `seed`, save it to `out_dir`."""
    config = JambaConfig.from_preset(preset, **overrides)
    torch.manual_seed(seed)
    model = JambaForCausalLM(config).to(dtype)
    model.save_pretrained(Path(out_dir))
    return model
