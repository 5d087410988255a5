"""Jamba checkpoints in the Hugging Face folder layout, under `transformers`' tensor names.

    config.json                         JambaConfig fields (model_type "jamba")
    generation_config.json              bos / eos / pad token ids
    model.safetensors                   all tensors, or, above `max_shard_size`:
    model-00001-of-0000N.safetensors    shards, with
    model.safetensors.index.json        {"metadata": {"total_size": bytes}, "weight_map": {name: file}}

Every file is written to a temporary name and renamed, so an interrupted save leaves the previous
checkpoint readable. Nothing is unpickled: weights are safetensors only.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from quintet.errors import CheckpointError
from quintet.io import (
    atomic_write_text,
    missing_weights,
    open_safetensors,
    tensor_mismatches,
    write_safetensors,
)
from quintet.models.jamba.configuration import JambaConfig

if TYPE_CHECKING:
    from quintet.models.jamba.modeling import JambaForCausalLM

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def is_weight_file(name: str) -> bool:
    """Whether a file name is one of a model folder's weight files (single, shard or index)."""
    return name in (WEIGHTS_NAME, INDEX_NAME) or bool(_SHARD_RE.match(name))


def parse_size(size: int | str) -> int:
    """`5GB` -> 5e9 bytes, `2GiB` -> 2 * 2**30, `500MB`, or a plain integer number of bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size = {size!r}: expected bytes or a size such as '500MB' or '2GiB'")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    powers.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(number * powers[unit])


def _state_dict_to_save(model: JambaForCausalLM) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_pretrained(
    model: JambaForCausalLM, directory: str | os.PathLike, max_shard_size: int | str = "5GB"
) -> None:
    """Write config, generation config and safetensors weights (sharded above `max_shard_size`)."""
    save_state_dict(model.config, model.state_dict(), directory, max_shard_size)


def save_state_dict(
    config: JambaConfig,
    state_dict: dict[str, torch.Tensor],
    directory: str | os.PathLike,
    max_shard_size: int | str = "5GB",
) -> None:
    """`save_pretrained` from a config and a full state dict (as gathered from a sharded model)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    state = {k: v.detach().contiguous() for k, v in state_dict.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes

    written = set()
    if len(shards) == 1:
        write_safetensors(shards[0], directory / WEIGHTS_NAME)
        written.add(WEIGHTS_NAME)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(shard, directory / fname)
            weight_map.update(dict.fromkeys(shard, fname))
            written.add(fname)
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(directory / INDEX_NAME, json.dumps(index, indent=2) + "\n")
        written.add(INDEX_NAME)
    # Remove weights of an earlier save that this one replaces (a single file after shards, or the reverse).
    for path in directory.iterdir():
        if path.name not in written and is_weight_file(path.name):
            path.unlink()

    config.save_pretrained(directory)
    generation = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }
    atomic_write_text(directory / "generation_config.json", json.dumps(generation, indent=2) + "\n")


def _weight_files(directory: Path) -> dict[str, Path]:
    """Map each tensor name to the file that holds it."""
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.is_file():
        with open_safetensors(single) as f:
            return dict.fromkeys(f.keys(), single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({err})") from None
        files = {name: directory / fname for name, fname in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise CheckpointError(f"{index}: names shard {path.name}, which is not in {directory}")
        return files
    raise missing_weights(single)


def load_pretrained(
    cls: type[JambaForCausalLM],
    directory: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> JambaForCausalLM:
    """Build the model from `config.json` and load its safetensors weights.

    Every missing, unexpected or wrongly shaped tensor is reported in one `CheckpointError`.
    `dtype` defaults to float32.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such model folder")
    config = JambaConfig.from_pretrained(directory)
    dtype = dtype or torch.float32
    with torch.device("meta"):
        model = cls(config)
    expected = {k: tuple(v.shape) for k, v in _state_dict_to_save(model).items()}

    files = _weight_files(directory)
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        with open_safetensors(path) as f:
            for name in f.keys():
                if files.get(name) == path:
                    shapes[name] = tuple(f.get_slice(name).get_shape())
    tied_extra = ("lm_head.weight",) if config.tie_word_embeddings else ()
    lines = tensor_mismatches(expected, shapes, optional=tied_extra)
    if lines:
        raise CheckpointError("\n".join([f"{directory}: the weights do not match config.json:", *lines]))

    state = {}
    for path in sorted(set(files.values())):
        with open_safetensors(path, device=str(device)) as f:
            for name in f.keys():
                if name in expected and files[name] == path:
                    state[name] = f.get_tensor(name).to(dtype)
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
