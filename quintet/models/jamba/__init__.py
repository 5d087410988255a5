"""Jamba, the hybrid Transformer-Mamba language model with mixture-of-experts layers."""

from quintet.models.jamba.cache import HybridCache
from quintet.models.jamba.checkpoint import CheckpointError
from quintet.models.jamba.configuration import PRESETS, ConfigError, JambaConfig
from quintet.models.jamba.modeling import CausalLMOutput, JambaForCausalLM
from quintet.models.jamba.numerics import training_numerics

__all__ = [
    "PRESETS",
    "CausalLMOutput",
    "CheckpointError",
    "ConfigError",
    "HybridCache",
    "JambaConfig",
    "JambaForCausalLM",
    "training_numerics",
]
