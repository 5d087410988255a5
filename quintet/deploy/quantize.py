"""Quantization as a module swap, and quantized model folders.

`quantize(model, QuantConfig(group_size=64))` replaces every `nn.Linear` (and `nn.Embedding`) of any
`nn.Module` by its M0E4 counterpart in place, the contract of gpt-fast's `quantize.py`. Modules whose names
match `skip` stay in floating point (for Jamba: `dt_proj` and `x_proj`, whose weights the Mamba mixer's
fused decode step reads directly in float (1-2% of a Mamba layer), and the MoE `router`, whose few weights
decide routing), as do those whose input width is not a multiple
of the group size.

The folder format, saving and loading: `quintet.deploy.quantized_folder`; a float folder to an FP4 folder:
`quintet.deploy.convert`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quintet.deploy.qlinear import M0E4Embedding, M0E4Linear
from quintet.kernels.m0e4 import GROUP_SIZES, M0E4Tensor, quantize_rtn

QUANT_METHOD = "m0e4"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
DEFAULT_SKIP = ("*dt_proj", "*x_proj", "*router")
CALIBRATIONS = ("rtn", "gptq")
FLOAT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class QuantConfig:
    """What `quantize` swaps and how. `skip`: fnmatch patterns on module names kept in floating point."""

    group_size: int = 64
    calibration: str = "rtn"
    skip: tuple[str, ...] = DEFAULT_SKIP
    embeddings: bool = True
    float_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.group_size not in GROUP_SIZES:
            raise ValueError(
                f"QuantConfig.group_size = {self.group_size!r}: must be one of "
                f"{', '.join(map(str, GROUP_SIZES))}"
            )
        if self.calibration not in CALIBRATIONS:
            raise ValueError(
                f"QuantConfig.calibration = {self.calibration!r}: must be one of {', '.join(CALIBRATIONS)}"
            )
        if self.float_dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"QuantConfig.float_dtype = {self.float_dtype!r}: must be one of {', '.join(FLOAT_DTYPES)}"
            )
        self.skip = tuple(self.skip)


def quantizable_modules(model: nn.Module, config: QuantConfig) -> dict[str, nn.Module]:
    """The Linear (and Embedding) modules `quantize` would swap, by name."""
    out = {}
    for name, module in model.named_modules():
        if any(fnmatch.fnmatch(name, p) for p in config.skip):
            continue
        if isinstance(module, nn.Linear) or (config.embeddings and isinstance(module, nn.Embedding)):
            k = module.in_features if isinstance(module, nn.Linear) else module.embedding_dim
            if k % config.group_size == 0:
                out[name] = module
    return out


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@torch.no_grad()
def quantize(
    model: nn.Module, config: QuantConfig | None = None, quantized: dict[str, M0E4Tensor] | None = None
) -> dict[str, Any]:
    """Swap the model's Linear / Embedding modules for M0E4 ones, in place; return `quantization_config`.

    `quantized` gives precomputed codes by module name (e.g. from GPTQ); the other modules are rounded to
    nearest.
    """
    config = config or QuantConfig()
    quantized = quantized or {}
    modules: dict[str, str] = {}
    for name, module in quantizable_modules(model, config).items():
        q = quantized.get(name) or quantize_rtn(module.weight.detach().float(), config.group_size, name)
        if isinstance(module, nn.Linear):
            new: nn.Module = M0E4Linear.from_quantized(q, module.bias)
            modules[name] = "linear"
        else:
            new = M0E4Embedding.from_quantized(q, module.padding_idx)
            modules[name] = "embedding"
        set_module(model, name, new)
    return {
        "quant_method": QUANT_METHOD,
        "bits": 4,
        "group_size": config.group_size,
        "calibration": config.calibration,
        "format_version": FORMAT_VERSION,
        "float_dtype": config.float_dtype,
        "skip": list(config.skip),
        "dequantize": "w = (float16(0x3C00 | q << 6) - offset) * scale, per group of group_size along in",
        "code_packing": "two codes per byte along in_features: low nibble = even index, high = odd",
        "modules": modules,
    }


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Swap every M0E4 module back to a plain Linear / Embedding holding its dequantized weight (in place).

    The reference a quantized model is compared against: the same weights, in ordinary float arithmetic.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, M0E4Linear):
            new: nn.Module = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            new.weight.data = module.dequantized_weight(dtype)
            if module.bias is not None:
                new.bias.data = module.bias.detach().to(dtype)
        elif isinstance(module, M0E4Embedding):
            new = nn.Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx)
            new.weight.data = module.dequantized_weight(dtype)
        else:
            continue
        set_module(model, name, new)
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return model
