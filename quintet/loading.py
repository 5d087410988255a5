"""One loader for every model folder quintet writes or reads.

    model = load_model("runs/aligned")        # Jamba float: JambaForCausalLM
    model = load_model("runs/aligned-fp4")    # Jamba FP4: the deploy engine (JambaEngine), 4-bit weights
    model = load_model("runs/vitar")          # ViTAR / ViT, float or FP4

The folder's config.json decides: `model_type` (jamba, vitar, vit) and whether it carries a
`quantization_config` (an FP4 folder written by `quintet deploy quantize`). A transformers-written Jamba
folder is a Jamba float folder. Every command and stage that runs a model from a folder goes through here,
so an FP4 folder works wherever a float one does. It sits above `models` and `deploy` (it imports both);
neither imports it.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from quintet.config import read_config
from quintet.errors import CheckpointError
from quintet.models import MODEL_TYPES as KINDS
from quintet.models import from_pretrained


class ModelFolderError(CheckpointError):
    """A folder is not a model folder quintet can open."""


def _model_type(folder: Path) -> tuple[str, bool]:
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: no such model folder")
    path = folder / "config.json"
    if not path.is_file():
        found = sorted(p.name for p in folder.iterdir())[:8]
        raise ModelFolderError(
            f"{folder}: no config.json (found {found or 'nothing'}); expected a model folder: config.json "
            "and model.safetensors"
        )
    config = read_config(path, "model config").data
    kind = config.get("model_type")
    if kind not in KINDS:
        raise ModelFolderError(f"{path}: model_type = {kind!r}: quintet opens {', '.join(KINDS)} folders")
    return kind, "quantization_config" in config


def load_model(folder: str | os.PathLike, activations: str | None = None) -> nn.Module:
    """The model of `folder`, ready to run (eval mode, CPU): see the module docstring for what each kind of
    folder gives. Raises `ModelFolderError` (or the format's own error, naming the file) for anything
    else. `activations`: for an FP4 Jamba folder, the inputs of its decode matmuls: "int8" (quantized per
    block of 32 and multiplied by integer dot products, as llama.cpp's Q4_0 does; the default where the
    kernels run AVX2 or AVX-512) or "float32" (exact to float32 rounding; the default elsewhere).
    `docs/deploy.md` has the speed and quality of each."""
    from quintet.kernels.m0e4_cpu import ACTIVATIONS

    folder = Path(folder)
    kind, quantized = _model_type(folder)
    if activations is not None and activations not in ACTIVATIONS:
        raise ValueError(f"activations = {activations!r}: must be one of {', '.join(ACTIVATIONS)}")
    if quantized:
        from quintet.deploy.quantized_folder import load_quantized

        model = load_quantized(folder, **({} if activations is None else {"activations": activations}))
        if activations not in (None, "float32") and not hasattr(model, "activations"):
            raise ValueError(f"{folder}: activations = {activations!r} applies to FP4 Jamba folders only")
        return model
    if activations not in (None, "float32"):
        raise ValueError(f"{folder}: activations = {activations!r} applies to FP4 folders; this one is float")
    return from_pretrained(folder, kind)


def load_model_and_tokenizer(folder: str | os.PathLike, activations: str | None = None):
    """`load_model(folder, activations)` and the folder's tokenizer (checked to fit the model's
    vocabulary)."""
    from quintet.tokenizer import load_tokenizer

    model = load_model(folder, activations)
    return model, load_tokenizer(folder, vocab_size=model.config.vocab_size)


def load_trainable_model(folder: str | os.PathLike) -> nn.Module:
    """A float Jamba to train or align from (`quintet train`, `quintet align`): a quintet or transformers
    folder. An FP4 folder is refused with the reason (its weights are 4-bit codes, for inference)."""
    folder = Path(folder)
    kind, quantized = _model_type(folder)
    if quantized:
        raise ModelFolderError(
            f"{folder / 'config.json'}: an FP4 (quantized) folder: training and alignment start from a float "
            "model folder (the FP4 folder's float parent)"
        )
    if kind != "jamba":
        raise ModelFolderError(
            f"{folder / 'config.json'}: model_type = {kind!r}: expected a Jamba folder here"
        )
    from quintet.models.jamba import JambaForCausalLM

    return JambaForCausalLM.from_pretrained(folder)
