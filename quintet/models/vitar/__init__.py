"""ViTAR (arXiv 2403.18361): a vision transformer for any resolution, and the plain ViT baseline."""

from quintet.models.vitar.atm import AdaptiveTokenMerger, AveragePoolMerger, GridAttention, gather_cells
from quintet.models.vitar.checkpoint import CheckpointError, build_model, load_model
from quintet.models.vitar.configuration import (
    PRESETS,
    ConfigError,
    ViTARConfig,
    ViTConfig,
    load_config,
    preset_config,
)
from quintet.models.vitar.flops import count_flops
from quintet.models.vitar.fpe import FuzzyPositionalEncoding
from quintet.models.vitar.grid_plan import AxisPlan, merge_schedule, merged_grid, plan_axis
from quintet.models.vitar.model import ViTAR
from quintet.models.vitar.vit import ViT

__all__ = [
    "PRESETS",
    "AdaptiveTokenMerger",
    "AveragePoolMerger",
    "AxisPlan",
    "CheckpointError",
    "ConfigError",
    "FuzzyPositionalEncoding",
    "GridAttention",
    "ViT",
    "ViTAR",
    "ViTARConfig",
    "ViTConfig",
    "build_model",
    "count_flops",
    "gather_cells",
    "load_config",
    "load_model",
    "merge_schedule",
    "merged_grid",
    "plan_axis",
    "preset_config",
]
