"""GGUF export of a Jamba model folder, so that llama.cpp (and Ollama, which runs it) can load the model.

`export_gguf(model_dir, out, type)` reads a float folder or an FP4 (M0E4) folder (dequantized to float32
first), and writes one GGUF file laid out as llama.cpp's Jamba loader (`src/models/jamba.cpp`) expects:

    metadata   general.architecture = "jamba", general.name, general.file_type
               jamba.block_count, .context_length (max_position_embeddings), .embedding_length,
               .feed_forward_length (intermediate_size), .attention.head_count,
               .attention.head_count_kv: one entry per layer, 0 on Mamba layers (how llama.cpp tells the
                   two apart), num_key_value_heads on attention layers
               .attention.layer_norm_rms_epsilon (also the eps of the dt, B and C norms)
               .ssm.conv_kernel, .ssm.inner_size (2 * hidden: the only Mamba expansion llama.cpp runs),
               .ssm.state_size, .ssm.time_step_rank, .expert_count, .expert_used_count
    tensors    token_embd, output_norm, output (left out when tied: llama.cpp reuses token_embd), and per
               layer blk.N.{attn_norm, ffn_norm} plus
                 attention  attn_q, attn_k, attn_v, attn_output
                 Mamba      ssm_in, ssm_conv1d (weight (d_inner, d_conv): the Conv1d's middle axis dropped;
                            and bias, zeros when the model has none: llama.cpp requires one), ssm_x,
                            ssm_dt (weight, bias), ssm_dt_norm, ssm_b_norm, ssm_c_norm,
                            ssm_a = -exp(A_log) (llama.cpp takes A itself), ssm_d, ssm_out
                 MoE        ffn_gate_inp (the router), ffn_{gate,up,down}_exps (the experts stacked
                            into one (experts, out, in) tensor each); dense: ffn_gate, ffn_up, ffn_down
               llama.cpp routes as we do: softmax over all experts, top-k weights not renormalised.

Types: `f32` everywhere; `q8_0` / `q4_0` (blocks of 32 weights with one scale, through `gguf.quants`) for
the weight matrices whose rows are a multiple of 32 long, token_embd and output included; as in
llama.cpp's converter, norms, 1-D tensors, ssm_conv1d, ssm_a, ssm_d, biases and the router stay f32.

Tokenizer (`tokenizer.ggml.*`): quintet's tokenizer.json is a byte-level BPE, llama.cpp's "gpt2" model:
tokens in id order (special tokens typed CONTROL, other added tokens USER_DEFINED), the merges, the bos /
eos / pad ids of config.json, and no bos or eos added on encode (quintet adds none). Ids the model has
beyond the tokenizer's become unused `[PAD<id>]` tokens, since llama.cpp sizes the vocabulary by the
token list. The pre-tokenizer: ours isolates every digit (Digits, individual_digits), then applies GPT-2's
regex; llama.cpp's "smollm" is exactly that (regexes `\\p{N}`, then GPT-2's) and, like us, does not
clean up spaces when decoding, so it is written as `tokenizer.ggml.pre`; a tokenizer with GPT-2's regex
alone is written as "gpt-2". A folder without tokenizer.json uses quintet's byte-level fallback (pad 0,
bos 1, eos 2, byte b = id b + 3): written as a BPE whose tokens are the 256 bytes, in GPT-2's byte-to-
character alphabet, with no merge that can ever apply (GGUF cannot store an empty list, and llama.cpp
requires the key), so every byte is its own token, as in quintet.

Chat template (`tokenizer.chat_template`): the folder's chat_template.jinja, else tokenizer_config.json's
`chat_template`, else quintet's default (`quintet.chat.CHAT_TEMPLATE`) when the
vocabulary has the role tokens it writes (an FP4 folder carries tokenizer.json but not
tokenizer_config.json).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tqdm import tqdm

from quintet.chat import BOS, CHAT_TEMPLATE, EOS, PAD, ROLES
from quintet.deploy.quantized_folder import load_dequantized, read_folder_config
from quintet.io import atomic_path
from quintet.models.jamba import JambaConfig, JambaForCausalLM
from quintet.tokenizer import ByteTokenizer, load_tokenizer

TYPES = ("f32", "q8_0", "q4_0")
_GGML_TYPES = {  # --type -> (the type of the quantized matrices, general.file_type)
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
ARCH = "jamba"
_PAD_TEMPLATE = "[PAD{}]"

# quintet (= transformers) tensor names within a layer -> llama.cpp's, without the "blk.N." prefix.
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "pre_ff_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mamba.in_proj.weight": "ssm_in.weight",
    "mamba.conv1d.weight": "ssm_conv1d.weight",
    "mamba.conv1d.bias": "ssm_conv1d.bias",
    "mamba.x_proj.weight": "ssm_x.weight",
    "mamba.dt_proj.weight": "ssm_dt.weight",
    "mamba.dt_proj.bias": "ssm_dt.bias",
    "mamba.dt_layernorm.weight": "ssm_dt_norm.weight",
    "mamba.b_layernorm.weight": "ssm_b_norm.weight",
    "mamba.c_layernorm.weight": "ssm_c_norm.weight",
    "mamba.A_log": "ssm_a",
    "mamba.D": "ssm_d",
    "mamba.out_proj.weight": "ssm_out.weight",
    "feed_forward.router.weight": "ffn_gate_inp.weight",
    "feed_forward.gate_proj.weight": "ffn_gate.weight",
    "feed_forward.up_proj.weight": "ffn_up.weight",
    "feed_forward.down_proj.weight": "ffn_down.weight",
}
_EXPERT_RE = re.compile(r"feed_forward\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
# Weight matrices that llama.cpp's converter keeps in f32 whatever the file type.
_ALWAYS_F32 = ("ffn_gate_inp.weight", "ssm_conv1d.weight")
# The pre-tokenizers of tokenizer.json that llama.cpp reproduces, by their `tokenizer.ggml.pre` name.
_GPT2_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_PRE_TOKENIZERS = {
    "smollm": [{"type": "Digits", "individual_digits": True}, _GPT2_BYTE_LEVEL],
    "gpt-2": [_GPT2_BYTE_LEVEL],
}


class GGUFExportError(ValueError):
    """The model folder cannot be written as a GGUF file llama.cpp runs."""


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, type: str = "f32") -> dict[str, Any]:
    """Write the Jamba model of `model_dir` (float or FP4) to the GGUF file `out` in `type` (f32, q8_0,
    q4_0). The file is written under a temporary name and renamed, so `out` is never half-written.

    Returns a summary: path, type, tensors, quantized_tensors, bytes, vocab, tokenizer_pre, chat_template.
    """
    if type not in TYPES:
        raise GGUFExportError(f"--type = {type!r}: valid types are {', '.join(TYPES)}")
    model_dir, out = Path(model_dir), Path(out)
    if out.is_dir():
        raise GGUFExportError(f"--out {out}: is a folder; give a file name such as model.gguf")
    model, source = _load_jamba(model_dir)
    config = model.config
    vocab = gguf_vocab(model_dir, config.vocab_size)
    qtype, file_type = _GGML_TYPES[type]
    block = gguf.GGML_QUANT_SIZES[qtype][0]

    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        try:
            writer.add_name(model_dir.resolve().name)
            writer.add_file_type(int(file_type))
            if type != "f32":
                writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _add_hparams(writer, config)
            _add_vocab(writer, vocab, config)
            count = quantized = 0
            for name, array in tqdm(gguf_tensors(model), desc="gguf", unit="tensor", disable=None):
                count += 1
                if type != "f32" and _quantizable(name, array, block):
                    writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
                    quantized += 1
                else:
                    writer.add_tensor(name, array)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return {
        "path": str(out),
        "type": type,
        "source": source,
        "tensors": count,
        "quantized_tensors": quantized,
        "bytes": out.stat().st_size,
        "vocab": len(vocab["tokens"]),
        "tokenizer_pre": vocab["pre"],
        "chat_template": vocab["chat_template"] is not None,
    }


# ------------------------------------------------------------------------------------------ the model
def _load_jamba(model_dir: Path) -> tuple[JambaForCausalLM, str]:
    """(float32 JambaForCausalLM, "float" | "m0e4"); an FP4 folder is dequantized."""
    base, qc = read_folder_config(model_dir)
    source = model_dir / "config.json"
    if base.get("model_type") != ARCH:
        raise GGUFExportError(
            f"{source}: model_type = {base.get('model_type')!r}: GGUF export supports 'jamba' only"
        )
    if base.get("mamba_expand", 2) != 2:
        raise GGUFExportError(
            f"{source}: mamba_expand = {base['mamba_expand']!r}: llama.cpp's Jamba runs only 2 "
            "(Mamba inner size = 2 * hidden_size)"
        )
    if base.get("mamba_proj_bias", False):
        raise GGUFExportError(
            f"{source}: mamba_proj_bias = true: llama.cpp's Jamba has no in_proj / out_proj bias; "
            "valid: false"
        )
    if qc is None:
        return JambaForCausalLM.from_pretrained(model_dir), "float"
    return load_dequantized(model_dir, torch.float32), qc["quant_method"]


def gguf_tensors(model: JambaForCausalLM) -> Iterator[tuple[str, np.ndarray]]:
    """(llama.cpp name, float32 array in llama.cpp's layout) for every tensor of a float Jamba model."""
    config = model.config
    state = {k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}
    embed = state.pop("model.embed_tokens.weight")
    yield "token_embd.weight", _array(embed)
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        layer = {k[len(prefix) :]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
        experts: dict[str, dict[int, torch.Tensor]] = {}
        if config.layers_block_type[i] == "mamba" and "mamba.conv1d.bias" not in layer:
            layer["mamba.conv1d.bias"] = torch.zeros(config.mamba_d_inner)
        for key, tensor in layer.items():
            if match := _EXPERT_RE.fullmatch(key):
                experts.setdefault(match.group(2), {})[int(match.group(1))] = tensor
                continue
            name = _LAYER_TENSORS.get(key)
            if name is None:
                raise GGUFExportError(f"model.layers.{i}.{key}: no llama.cpp Jamba tensor for it")
            if key == "mamba.A_log":
                tensor = -torch.exp(tensor)
            elif key == "mamba.conv1d.weight":
                tensor = tensor.squeeze(1)  # (d_inner, 1, d_conv) -> (d_inner, d_conv)
            yield f"blk.{i}.{name}", _array(tensor)
        for proj in ("gate", "up", "down"):
            if proj in experts:
                stacked = torch.stack([experts[proj][e] for e in range(len(experts[proj]))])
                yield f"blk.{i}.ffn_{proj}_exps.weight", _array(stacked)
    yield "output_norm.weight", _array(state.pop("model.final_layernorm.weight"))
    head = state.pop("lm_head.weight")
    if not config.tie_word_embeddings:
        yield "output.weight", _array(head)
    if state:
        raise GGUFExportError(f"tensors with no llama.cpp Jamba counterpart: {', '.join(sorted(state))}")


def _array(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.numpy(), dtype=np.float32)


def _quantizable(name: str, array: np.ndarray, block: int) -> bool:
    """A weight matrix (or stack of expert matrices) with rows a multiple of the block long, not one of
    the tensors llama.cpp keeps in f32."""
    short = name.split(".", 2)[-1] if name.startswith("blk.") else name
    return (
        array.ndim >= 2
        and name.endswith(".weight")
        and not name.endswith("_norm.weight")
        and short not in _ALWAYS_F32
        and array.shape[-1] % block == 0
    )


def _add_hparams(writer: gguf.GGUFWriter, config: JambaConfig) -> None:
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(
        [config.num_key_value_heads if t == "attention" else 0 for t in config.layers_block_type]
    )
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_ssm_conv_kernel(config.mamba_d_conv)
    writer.add_ssm_inner_size(config.mamba_d_inner)
    writer.add_ssm_state_size(config.mamba_d_state)
    writer.add_ssm_time_step_rank(config.mamba_dt_rank)
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)


# ------------------------------------------------------------------------------------------ the tokenizer
def gguf_vocab(model_dir: str | os.PathLike, vocab_size: int) -> dict[str, Any]:
    """The folder's tokenizer as llama.cpp's "gpt2" BPE: tokens, token_types, merges, pre, chat_template,
    padded to the model's `vocab_size` with unused tokens."""
    model_dir = Path(model_dir)
    load_tokenizer(model_dir, vocab_size=vocab_size)  # checks that every id fits the model
    path = model_dir / "tokenizer.json"
    if path.is_file():
        tokens, types, merges, pre = _read_byte_level_bpe(path)
    else:
        tokens, types, merges, pre = _byte_fallback()
    for i, token in enumerate(tokens):
        if token is None:
            tokens[i], types[i] = _PAD_TEMPLATE.format(i), gguf.TokenType.UNUSED
    for i in range(len(tokens), vocab_size):
        tokens.append(_PAD_TEMPLATE.format(i))
        types.append(gguf.TokenType.UNUSED)
    return {
        "tokens": tokens,
        "token_types": [int(t) for t in types],
        "merges": merges,
        "pre": pre,
        "chat_template": _chat_template(model_dir, set(tokens)),
    }


def _read_byte_level_bpe(path: Path) -> tuple[list, list, list[str], str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GGUFExportError(f"{path}: not valid JSON ({err})") from None
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(f"{path}: model.type = {model.get('type')!r}: GGUF export writes 'BPE' only")
    if data.get("normalizer") is not None:
        raise GGUFExportError(
            f"{path}: normalizer = {json.dumps(data['normalizer'])}: llama.cpp's BPE has none; valid: null"
        )
    pre = _pre_tokenizer_name(path, data.get("pre_tokenizer"))
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    specials = {}
    for added in data.get("added_tokens") or []:
        vocab[added["content"]] = added["id"]
        specials[added["id"]] = added.get("special", False)
    size = max(vocab.values()) + 1
    tokens: list[str | None] = [None] * size
    types: list[int] = [gguf.TokenType.NORMAL] * size
    for token, i in vocab.items():
        tokens[i] = token
        if i in specials:
            types[i] = gguf.TokenType.CONTROL if specials[i] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return tokens, types, merges, pre


def _pre_tokenizer_name(path: Path, pre_tokenizer: Any) -> str:
    steps = []
    if isinstance(pre_tokenizer, dict):
        steps = (
            pre_tokenizer.get("pretokenizers", [])
            if pre_tokenizer.get("type") == "Sequence"
            else [pre_tokenizer]
        )
    for name, wanted in _PRE_TOKENIZERS.items():
        if len(steps) == len(wanted) and all(
            all(step.get(k) == v for k, v in want.items()) for step, want in zip(steps, wanted, strict=True)
        ):
            return name
    raise GGUFExportError(
        f"{path}: pre_tokenizer = {json.dumps(pre_tokenizer)}: llama.cpp reproduces quintet's "
        "Digits(individual_digits) + ByteLevel(use_regex, no prefix space), or that ByteLevel alone"
    )


def _byte_fallback() -> tuple[list, list, list[str], str]:
    """quintet's ByteTokenizer as a BPE over GPT-2's byte alphabet with one merge that never applies (two
    special tokens, which are never BPE symbols)."""
    specials = [PAD, BOS, EOS]  # ids ByteTokenizer.pad/bos/eos_token_id = 0, 1, 2
    tokens = specials + [_BYTE_TO_CHAR[b] for b in range(256)]  # byte b: id b + ByteTokenizer.offset
    types = [gguf.TokenType.CONTROL] * ByteTokenizer.offset + [gguf.TokenType.NORMAL] * 256
    return tokens, types, [f"{specials[0]} {specials[1]}"], "gpt-2"


def _gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what byte-level BPE vocabularies are written in)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _gpt2_byte_alphabet()


def _chat_template(model_dir: Path, tokens: set[str]) -> str | list | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config_path = model_dir / "tokenizer_config.json"
    if config_path.is_file():
        try:
            template = json.loads(config_path.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise GGUFExportError(f"{config_path}: not a JSON object ({err})") from None
        if template:
            return template
    if {EOS, *(f"<|{role}|>" for role in ROLES)} <= tokens:
        return CHAT_TEMPLATE
    return None


def _add_vocab(writer: gguf.GGUFWriter, vocab: dict[str, Any], config: JambaConfig) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["token_types"])
    writer.add_token_merges(vocab["merges"])
    if config.bos_token_id is not None:
        writer.add_bos_token_id(config.bos_token_id)
    if config.eos_token_ids:
        writer.add_eos_token_id(config.eos_token_ids[0])
    if config.pad_token_id is not None:
        writer.add_pad_token_id(config.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if vocab["chat_template"] is not None:
        writer.add_chat_template(vocab["chat_template"])
