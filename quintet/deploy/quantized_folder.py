"""Quantized (FP4) model folders: writing, checking and loading them.

A quantized folder is the model folder of the float model with:

    config.json        the model's config, plus "quantization_config": {"quant_method": "m0e4", "bits": 4,
                       "group_size": G, "calibration": "rtn" | "gptq", "format_version": 1,
                       "float_dtype": "bfloat16", "modules": {name: "linear" | "embedding"}, ...}
    model.safetensors  per quantized module `NAME.qweight` (uint8, N x K/2), `NAME.scales` and
                       `NAME.offsets` (float16, N x K/G), `NAME.bias` if any; every other tensor in
                       `float_dtype`
    tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json, ...
                       the source folder's `quintet.io.MODEL_FILES`, copied when it has them
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quintet.config import read_config
from quintet.deploy.engine import JambaEngine
from quintet.deploy.qlinear import M0E4Embedding, M0E4Linear
from quintet.deploy.quantize import FLOAT_DTYPES, FORMAT_VERSION, QUANT_METHOD, dequantize_model, set_module
from quintet.errors import CheckpointError
from quintet.io import (
    atomic_write_text,
    copy_model_files,
    read_safetensors,
    tensor_mismatches,
    write_safetensors,
)
from quintet.kernels.m0e4 import GROUP_SIZES
from quintet.models import build_skeleton
from quintet.models.jamba import JambaForCausalLM

WEIGHTS_NAME = "model.safetensors"


class QuantizedCheckpointError(CheckpointError):
    """A quantized folder is corrupt or does not match its config.json."""


# ------------------------------------------------------------------------------------------ saving
def _m0e4_tensor_names(model: nn.Module) -> set[str]:
    return {
        f"{name}.{b}" if name else b
        for name, m in model.named_modules()
        if isinstance(m, (M0E4Linear, M0E4Embedding))
        for b in ("qweight", "scales", "offsets")
    }


def quantized_state_dict(
    model: nn.Module, float_dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a quantized folder: M0E4 buffers as they are, every other float tensor in
    `float_dtype`; and the tied names (a tensor stored once under its first name: {other name: first})."""
    m0e4_names = _m0e4_tensor_names(model)
    state: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first: dict[tuple[int, tuple[int, ...]], str] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.data_ptr(), tuple(t.shape))
        if key in first:
            tied[name] = first[key]
            continue
        first[key] = name
        t = t.detach()
        if name not in m0e4_names and t.is_floating_point():
            t = t.to(float_dtype)
        state[name] = t.contiguous()
    return state, tied


def save_quantized(
    model: nn.Module,
    directory: str | os.PathLike,
    base_config: dict[str, Any],
    quantization_config: dict[str, Any],
    source_dir: str | os.PathLike | None = None,
) -> Path:
    """Write a quantized folder: weights, config.json with `quantization_config`, tokenizer files copied."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state, tied = quantized_state_dict(model, FLOAT_DTYPES[quantization_config["float_dtype"]])
    quantization_config = {**quantization_config, "tied": tied}
    write_safetensors(state, directory / WEIGHTS_NAME, metadata={"quant_method": QUANT_METHOD})
    config = {k: v for k, v in base_config.items() if k != "quantization_config"}
    config["quantization_config"] = quantization_config
    atomic_write_text(directory / "config.json", json.dumps(config, indent=2) + "\n")
    if source_dir is not None:
        copy_model_files(source_dir, directory)
    return directory


# ------------------------------------------------------------------------------------------ loading
def read_folder_config(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(config.json without its quantization_config, the quantization_config or None)."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"{directory}: no such model folder")
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in the model folder {directory}")
    data = read_config(path, "model config").data
    qc = data.pop("quantization_config", None)
    if qc is not None:
        check_quantization_config(qc, str(path))
    return data, qc


def check_quantization_config(qc: Any, source: str) -> None:
    where = f"{source}: quantization_config"
    if not isinstance(qc, dict):
        raise QuantizedCheckpointError(f"{where}: expected a JSON object, got {type(qc).__name__}")
    expect = {"quant_method": (QUANT_METHOD,), "bits": (4,), "format_version": (FORMAT_VERSION,)}
    for key, valid in expect.items():
        if qc.get(key) not in valid:
            raise QuantizedCheckpointError(
                f"{where}.{key} = {qc.get(key)!r}: quintet reads {', '.join(map(repr, valid))}"
            )
    if qc.get("group_size") not in GROUP_SIZES:
        raise QuantizedCheckpointError(
            f"{where}.group_size = {qc.get('group_size')!r}: valid values are "
            f"{', '.join(map(str, GROUP_SIZES))}"
        )
    if qc.get("float_dtype") not in FLOAT_DTYPES:
        raise QuantizedCheckpointError(
            f"{where}.float_dtype = {qc.get('float_dtype')!r}: valid values are {', '.join(FLOAT_DTYPES)}"
        )
    modules = qc.get("modules")
    if not isinstance(modules, dict) or any(v not in ("linear", "embedding") for v in modules.values()):
        raise QuantizedCheckpointError(
            f"{where}.modules: expected an object mapping module names to 'linear' or 'embedding'"
        )


def swap_to_m0e4(model: nn.Module, qc: dict[str, Any], source: str) -> None:
    """Replace the modules `qc["modules"]` names by empty M0E4 modules of the same shape (for loading)."""
    g = qc["group_size"]
    for name, kind in qc["modules"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise QuantizedCheckpointError(
                f"{source}: quantization_config.modules names {name!r}, which this model does not have"
            ) from None
        want = nn.Linear if kind == "linear" else nn.Embedding
        if not isinstance(module, want):
            raise QuantizedCheckpointError(
                f"{source}: quantization_config.modules[{name!r}] = {kind!r}, but the model's {name} is a "
                f"{type(module).__name__}"
            )
        k = module.in_features if kind == "linear" else module.embedding_dim
        if k % g:
            raise QuantizedCheckpointError(
                f"{source}: {name} has {k} input features, not a multiple of group_size = {g}"
            )
        if kind == "linear":
            new: nn.Module = M0E4Linear(
                module.in_features, module.out_features, g, module.bias is not None, device="meta"
            )
        else:
            new = M0E4Embedding(
                module.num_embeddings, module.embedding_dim, g, module.padding_idx, device="meta"
            )
        set_module(model, name, new)


def load_quantized_state(
    model: nn.Module, directory: str | os.PathLike, qc: dict[str, Any], dtype: torch.dtype
) -> None:
    """Load a quantized folder's tensors into a model already swapped by `swap_to_m0e4`; check everything.

    Every missing, unexpected, mis-shaped or mis-typed tensor is reported in one error, and scales or
    offsets that are not finite are named. Float tensors other than M0E4 scales / offsets become `dtype`.
    """
    path = Path(directory) / WEIGHTS_NAME
    tensors = read_safetensors(path)
    expected = model.state_dict()
    m0e4_names = _m0e4_tensor_names(model)
    tied = qc.get("tied") or {}
    lines = tensor_mismatches(
        {k: v.shape for k, v in expected.items() if k not in tied}, {k: v.shape for k, v in tensors.items()}
    )
    lines += [
        f"  tied tensor {k} names {v}, which is not in the file" for k, v in tied.items() if v not in tensors
    ]
    float_dtype = FLOAT_DTYPES[qc["float_dtype"]]
    for name in sorted(set(expected) & set(tensors)):
        want, got = expected[name], tensors[name]
        if tuple(want.shape) != tuple(got.shape):
            continue  # reported above
        want_dtype = (
            want.dtype if name in m0e4_names else float_dtype if want.is_floating_point() else want.dtype
        )
        if got.dtype != want_dtype:
            lines.append(f"  wrong dtype: {name}: found {got.dtype}, expected {want_dtype}")
            continue
        if name in m0e4_names and got.is_floating_point() and not torch.isfinite(got).all():
            i, j = (~torch.isfinite(got)).nonzero()[0].tolist()
            lines.append(f"  {name}[{i}, {j}] = {got[i, j].item()}: scales and offsets must be finite")
    if lines:
        raise QuantizedCheckpointError(
            f"{path}: the weights do not match config.json (group_size {qc['group_size']}):\n"
            + "\n".join(lines)
        )
    # copies in ordinary memory, not views of the file's mapping: the engine merges some modules (q/k/v,
    # gate/up) into new tensors, and a dropped original still mapped would stay resident beside its copy
    state = {
        name: t.clone() if name in m0e4_names or not t.is_floating_point() else t.to(dtype, copy=True)
        for name, t in tensors.items()
    }
    del tensors
    for name, source in tied.items():
        state[name] = state[source]
    model.load_state_dict(state, strict=True, assign=True)
    for name, source in tied.items():  # share the tensor again, as the float model did
        owner, _, leaf = name.rpartition(".")
        src_owner, _, src_leaf = source.rpartition(".")
        setattr(model.get_submodule(owner), leaf, getattr(model.get_submodule(src_owner), src_leaf))


def file_bytes(directory: str | os.PathLike) -> int:
    """Bytes of the weight files of a model folder (*.safetensors)."""
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------- loading
def load_quantized_model(directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of a quantized folder with its M0E4 modules (not yet wrapped in an engine); float
    tensors in `dtype`. Raises `QuantizedCheckpointError` naming the file, the tensor and the problem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such model folder")
    base, qc = read_folder_config(directory)
    source = str(directory / "config.json")
    if qc is None:
        raise QuantizedCheckpointError(f"{source}: no quantization_config; not a quantized model folder")
    model = build_skeleton(base, source)
    swap_to_m0e4(model, qc, source)
    load_quantized_state(model, directory, qc, dtype)
    model.quantization_config = qc
    return model.eval()


def load_quantized(
    directory: str | os.PathLike,
    fuse: bool = True,
    dtype: torch.dtype = torch.float32,
    **engine_kwargs,
) -> nn.Module:
    """A quantized folder ready to run: a `JambaEngine` for Jamba, the quantized model for ViTAR / ViT.

    The weights stay in 4 bits; every quantized matmul runs from them in float32 (the M0E4 kernels, see
    `quintet.kernels.m0e4_cpu`). `dtype`: the activations between matmuls and the KV cache (float32 by
    default: exact to float32 rounding, and fastest on CPUs without native bfloat16). For a Jamba engine,
    `activations` are the decode matmuls' inputs: "int8" quantizes them per block of 32 and multiplies by
    integer dot products (llama.cpp's trade for Q4_0: about 2x faster decode matmuls, the rounding error
    of 8-bit activations), "float32" keeps them exact; "auto" (the default) is int8 where the kernels run
    AVX2 or AVX-512, else float32. Prefill is unchanged.
    """
    model = load_quantized_model(directory, dtype)
    if isinstance(model, JambaForCausalLM):
        return JambaEngine(
            model, dtype=dtype, fuse=fuse, quantization_config=model.quantization_config, **engine_kwargs
        )
    return model


def load_dequantized(directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The quantized folder's model with plain float layers holding the dequantized weights (the reference
    the engine is compared against, and what a float tool can run)."""
    return dequantize_model(load_quantized_model(directory, dtype), dtype)
