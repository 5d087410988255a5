"""Size of a Jamba model computed from its config alone: parameters, layout, cache and state memory.

Nothing is instantiated, so the paper's 52B shape is counted as fast as a tiny one; a test checks the
counts against `sum(p.numel())` of built models.
"""

from __future__ import annotations

from typing import Any

import torch

from quintet.models.jamba.configuration import JambaConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _mlp_params(cfg: JambaConfig) -> int:
    return 3 * cfg.hidden_size * cfg.intermediate_size


def _attention_params(cfg: JambaConfig) -> int:
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    return 2 * h * h + 2 * h * kv


def _mamba_params(cfg: JambaConfig) -> int:
    h, di, n, r, k = (
        cfg.hidden_size,
        cfg.mamba_d_inner,
        cfg.mamba_d_state,
        cfg.mamba_dt_rank,
        cfg.mamba_d_conv,
    )
    params = h * 2 * di + di * k + di * (r + 2 * n) + (r * di + di) + di * n + di + di * h + (r + 2 * n)
    if cfg.mamba_conv_bias:
        params += di
    if cfg.mamba_proj_bias:
        params += 2 * di + h
    return params


def parameter_counts(cfg: JambaConfig) -> dict[str, int]:
    """`total` and `active` (per token: top-k of the experts in MoE layers) parameter counts."""
    embed = cfg.vocab_size * cfg.hidden_size
    total = active = embed + cfg.hidden_size + (0 if cfg.tie_word_embeddings else embed)
    for kind, experts in zip(cfg.layers_block_type, cfg.layers_num_experts, strict=True):
        mixer = _attention_params(cfg) if kind == "attention" else _mamba_params(cfg)
        common = mixer + 2 * cfg.hidden_size
        if experts > 1:
            router = experts * cfg.hidden_size
            total += common + router + experts * _mlp_params(cfg)
            active += common + router + cfg.num_experts_per_tok * _mlp_params(cfg)
        else:
            total += common + _mlp_params(cfg)
            active += common + _mlp_params(cfg)
    return {"total": total, "active": active}


def cache_bytes(
    cfg: JambaConfig, context_length: int, dtype: str = "bfloat16", batch_size: int = 1
) -> dict[str, int]:
    """Inference memory at `context_length` tokens.

    kv:            K and V of the attention layers, in `dtype`
    mamba:         per Mamba layer, the conv state (d_inner x (d_conv - 1), in `dtype`) and the SSM state
                   (d_inner x d_state, float32): constant in the context length
    all_attention: K and V if every layer were attention (same heads and head size), for comparison
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype = {dtype!r}: expected one of {', '.join(_DTYPES)}")
    if not isinstance(context_length, int) or context_length < 0:
        raise ValueError(f"context_length = {context_length!r}: must be an integer >= 0")
    size = _DTYPES[dtype].itemsize
    per_layer_kv = 2 * cfg.num_key_value_heads * cfg.head_dim * context_length * size * batch_size
    n_attn = cfg.layers_block_type.count("attention")
    n_mamba = cfg.num_hidden_layers - n_attn
    di = cfg.mamba_d_inner
    per_layer_mamba = (di * (cfg.mamba_d_conv - 1) * size + di * cfg.mamba_d_state * 4) * batch_size
    return {
        "kv": n_attn * per_layer_kv,
        "mamba": n_mamba * per_layer_mamba,
        "all_attention": cfg.num_hidden_layers * per_layer_kv,
    }


def model_info(
    cfg: JambaConfig, context_length: int = 262144, dtype: str = "bfloat16", batch_size: int = 1
) -> dict[str, Any]:
    """Everything `quintet model info` prints, as a JSON-ready dict."""
    moe = "".join("E" if e > 1 else "-" for e in cfg.layers_num_experts)
    return {
        "layers": cfg.num_hidden_layers,
        "layout": cfg.layout,
        "moe_layout": moe,
        "parameters": parameter_counts(cfg),
        "context_length": context_length,
        "dtype": dtype,
        "batch_size": batch_size,
        "cache_bytes": cache_bytes(cfg, context_length, dtype, batch_size),
    }


def _human(n: float, units: tuple[str, ...], base: int) -> str:
    for unit in units[:-1]:
        if abs(n) < base:
            return f"{n:.3g} {unit}".strip()
        n /= base
    return f"{n:.3g} {units[-1]}"


def format_info(info: dict[str, Any]) -> str:
    p, c = info["parameters"], info["cache_bytes"]
    params = ("", "K", "M", "B", "T")
    size = ("B", "KiB", "MiB", "GiB", "TiB")
    ctx = info["context_length"]
    total, active = _human(p["total"], params, 1000), _human(p["active"], params, 1000)
    return "\n".join(
        [
            f"layers            {info['layers']}",
            f"layout            {info['layout']}   (A attention, m Mamba)",
            f"experts           {info['moe_layout']}   (E mixture of experts, - dense MLP)",
            f"parameters        {total} total, {active} active per token  ({p['total']:,} / {p['active']:,})",
            f"K/V cache         {_human(c['kv'], size, 1024)} at {ctx:,} tokens in {info['dtype']} "
            f"(batch {info['batch_size']})",
            f"Mamba state       {_human(c['mamba'], size, 1024)} (constant in context length)",
            f"all-attention K/V {_human(c['all_attention'], size, 1024)} "
            "for the same shape with attention in every layer",
        ]
    )
