"""Quantization as a module swap, and quantized model folders.

`quantize(model, QuantConfig(group_size=64))` replaces every `nn.Linear` (and `nn.Embedding`) of any
`nn.Module` by its M0E4 counterpart in place, the contract of gpt-fast's `quantize.py`. Modules whose names
match `skip` stay in floating point (for Jamba: `dt_proj` and `x_proj`, whose weights the Mamba mixer's
fused decode step reads directly in float (1-2% of a Mamba layer), and the MoE `router`, whose few weights
decide routing), as do those whose input width is not a multiple
of the group size.

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

import fnmatch
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from quintet.deploy.m0e4 import GROUP_SIZES, M0E4Tensor, quantize_rtn
from quintet.deploy.qlinear import M0E4Embedding, M0E4Linear
from quintet.io import atomic_path, atomic_write_text, copy_model_files

QUANT_METHOD = "m0e4"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
DEFAULT_SKIP = ("*dt_proj", "*x_proj", "*router")
CALIBRATIONS = ("rtn", "gptq")
_FLOAT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class QuantizedCheckpointError(ValueError):
    """A quantized folder is corrupt or does not match its config.json."""


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
        if self.float_dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"QuantConfig.float_dtype = {self.float_dtype!r}: must be one of {', '.join(_FLOAT_DTYPES)}"
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


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
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
        _set_module(model, name, new)
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
        _set_module(model, name, new)
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return model


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
    state, tied = quantized_state_dict(model, _FLOAT_DTYPES[quantization_config["float_dtype"]])
    quantization_config = {**quantization_config, "tied": tied}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "quant_method": QUANT_METHOD})
    config = {k: v for k, v in base_config.items() if k != "quantization_config"}
    config["quantization_config"] = quantization_config
    atomic_write_text(directory / "config.json", json.dumps(config, indent=2) + "\n")
    if source_dir is not None:
        copy_model_files(source_dir, directory)
    return directory


# ------------------------------------------------------------------------------------------ loading
def read_config(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(config.json without its quantization_config, the quantization_config or None)."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"{directory}: no such model folder")
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in the model folder {directory}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise QuantizedCheckpointError(
            f"{path}: not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}"
        ) from None
    if not isinstance(data, dict):
        raise QuantizedCheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
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
    if qc.get("float_dtype") not in _FLOAT_DTYPES:
        raise QuantizedCheckpointError(
            f"{where}.float_dtype = {qc.get('float_dtype')!r}: valid values are {', '.join(_FLOAT_DTYPES)}"
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
        _set_module(model, name, new)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        pickles = [p.name for p in path.parent.glob("*") if p.suffix in (".bin", ".pt", ".pth")]
        hint = f"; found only pickle weights {pickles}, which quintet never reads" if pickles else ""
        raise QuantizedCheckpointError(f"{path}: missing{hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated or garbled files
        raise QuantizedCheckpointError(
            f"{path}: not a readable safetensors file ({type(err).__name__}: {err}); the file is corrupt or "
            "truncated: quantize the model again"
        ) from None


def load_quantized_state(
    model: nn.Module, directory: str | os.PathLike, qc: dict[str, Any], dtype: torch.dtype
) -> None:
    """Load a quantized folder's tensors into a model already swapped by `swap_to_m0e4`; check everything.

    Every missing, unexpected, mis-shaped or mis-typed tensor is reported in one error, and scales or
    offsets that are not finite are named. Float tensors other than M0E4 scales / offsets become `dtype`.
    """
    path = Path(directory) / WEIGHTS_NAME
    tensors = read_weights(path)
    expected = model.state_dict()
    m0e4_names = _m0e4_tensor_names(model)
    tied = qc.get("tied") or {}
    missing = sorted(set(expected) - set(tensors) - set(tied))
    unexpected = sorted(set(tensors) - set(expected))
    lines = [f"  missing tensor: {k} (expected shape {list(expected[k].shape)})" for k in missing]
    lines += [f"  unexpected tensor: {k} (shape {list(tensors[k].shape)})" for k in unexpected]
    lines += [
        f"  tied tensor {k} names {v}, which is not in the file" for k, v in tied.items() if v not in tensors
    ]
    float_dtype = _FLOAT_DTYPES[qc["float_dtype"]]
    for name in sorted(set(expected) & set(tensors)):
        want, got = expected[name], tensors[name]
        if tuple(want.shape) != tuple(got.shape):
            lines.append(f"  wrong shape: {name}: found {list(got.shape)}, expected {list(want.shape)}")
            continue
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


# ------------------------------------------------------------------------------------------ model folders
def build_skeleton(base: dict[str, Any], source: str) -> nn.Module:
    """An uninitialised model of the folder's `model_type` (Jamba on the meta device: weights come later)."""
    model_type = base.get("model_type")
    if model_type == "jamba":
        from quintet.models.jamba import JambaConfig, JambaForCausalLM

        config = JambaConfig.from_dict(base, source=source)
        with torch.device("meta"):
            return JambaForCausalLM(config)
    if model_type in ("vitar", "vit"):
        from quintet.models.vitar.checkpoint import build_model
        from quintet.models.vitar.configuration import config_from_dict

        return build_model(config_from_dict(base, source=source))
    raise QuantizedCheckpointError(f"{source}: model_type = {model_type!r}: valid values: jamba, vitar, vit")


def load_float_model(directory: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """A float model folder's model (float32) and its config.json dict."""
    base, qc = read_config(directory)
    if qc is not None:
        raise ValueError(
            f"{directory}: already quantized ({qc['quant_method']}); give the float model folder"
        )
    if base.get("model_type") == "jamba":
        from quintet.models.jamba import JambaForCausalLM

        return JambaForCausalLM.from_pretrained(directory), base
    if base.get("model_type") in ("vitar", "vit"):
        from quintet.models.vitar.checkpoint import load_model

        return load_model(directory), base
    raise ValueError(
        f"{directory}/config.json: model_type = {base.get('model_type')!r}: valid: jamba, vitar, vit"
    )


def quantize_folder(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    group_size: int = 64,
    gptq: str | os.PathLike | None = None,
    gptq_samples: int = 32,
    gptq_seq_len: int = 256,
    skip: tuple[str, ...] = DEFAULT_SKIP,
) -> dict[str, Any]:
    """Quantize a float model folder into `out_dir`; round to nearest, or GPTQ on the JSONL file `gptq`.

    Returns a summary: modules quantized, bytes of the weight files before and after, calibration tokens.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError(f"--out {out_dir}: the same folder as the model; give a new folder")
    model, base = load_float_model(model_dir)
    config = QuantConfig(group_size=group_size, calibration="gptq" if gptq else "rtn", skip=skip)
    quantized = None
    calibration_tokens = 0
    if gptq is not None:
        if base.get("model_type") != "jamba":
            raise ValueError(
                f"--gptq: GPTQ calibration is implemented for Jamba text models, not {base['model_type']}"
            )
        from quintet.deploy.gptq import gptq_quantize_jamba, read_calibration
        from quintet.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model_dir, vocab_size=model.config.vocab_size)
        samples = read_calibration(gptq, tokenizer.encode, gptq_seq_len, gptq_samples)
        calibration_tokens = sum(s.numel() for s in samples)
        quantized = gptq_quantize_jamba(model, samples, config)
    qc = quantize(model, config, quantized)
    if gptq is not None:
        qc["calibration_file"] = str(gptq)
        qc["calibration_tokens"] = calibration_tokens
    save_quantized(model, out_dir, base, qc, model_dir)
    return {
        "model": str(model_dir),
        "out": str(out_dir),
        "group_size": group_size,
        "calibration": config.calibration,
        "calibration_tokens": calibration_tokens,
        "modules_quantized": len(qc["modules"]),
        "bytes_before": file_bytes(model_dir),
        "bytes_after": file_bytes(out_dir),
    }
