"""Model families: `jamba` (hybrid Transformer-Mamba-MoE language model) and `vitar` (ViTAR and a plain ViT).

A model folder's config.json says which by its `model_type`; `build_skeleton` and `from_pretrained` are the
one place that maps a `model_type` to its classes. Models import nothing from quintet's stages (train,
align, eval, safety, deploy, data): see docs/architecture.md.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from quintet.errors import CheckpointError

MODEL_TYPES = ("jamba", "vitar", "vit")


def _unknown(model_type: Any, source: str) -> CheckpointError:
    return CheckpointError(f"{source}: model_type = {model_type!r}: valid values: {', '.join(MODEL_TYPES)}")


def build_skeleton(config: dict[str, Any], source: str) -> nn.Module:
    """An uninitialised model for a config.json dict (Jamba on the meta device: its weights come later)."""
    model_type = config.get("model_type")
    if model_type == "jamba":
        from quintet.models.jamba import JambaConfig, JambaForCausalLM

        jamba_config = JambaConfig.from_dict(config, source=source)
        with torch.device("meta"):
            return JambaForCausalLM(jamba_config)
    if model_type in ("vitar", "vit"):
        from quintet.models.vitar.checkpoint import build_model
        from quintet.models.vitar.configuration import config_from_dict

        return build_model(config_from_dict(config, source=source))
    raise _unknown(model_type, source)


def from_pretrained(folder: str | os.PathLike, model_type: str) -> nn.Module:
    """The float model of a model folder whose config.json has `model_type` (eval mode, CPU, float32)."""
    if model_type == "jamba":
        from quintet.models.jamba import JambaForCausalLM

        return JambaForCausalLM.from_pretrained(folder).eval()
    if model_type in ("vitar", "vit"):
        from quintet.models.vitar.checkpoint import load_model

        return load_model(folder)
    raise _unknown(model_type, f"{folder}/config.json")
