"""Grouped-query causal self-attention with PyTorch SDPA and no positional encoding (Jamba has none)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quintet.models.jamba.cache import HybridCache
from quintet.models.jamba.configuration import JambaConfig
from quintet.models.jamba.numerics import inference_paths


class JambaAttention(nn.Module):
    """q/k/v/o projections without bias; `num_key_value_heads` K/V heads shared by groups of queries.

    For inference the deploy engine may merge q/k/v into one matmul (`use_merged_qkv`) and give a cache
    whose key length is padded (`cache.pad_multiple` > 1: the padded slots are masked)."""

    def __init__(self, config: JambaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)
        self.qkv_proj: nn.Module | None = None

    def use_merged_qkv(self, qkv_proj: nn.Module) -> None:
        """Compute q, k and v with one module whose output is [q | k | v] (it replaces the three)."""
        self.qkv_proj = qkv_proj
        del self.q_proj, self.k_proj, self.v_proj

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        kv = self.num_kv_heads * self.head_dim
        return self.qkv_proj(x).split([self.num_heads * self.head_dim, kv, kv], dim=-1)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, cache: HybridCache | None = None
    ) -> torch.Tensor:
        """x: (b, L, hidden). attn_mask: None for causal attention over the past and x, else a boolean
        (b, 1, L, past + L) mask, True where a query may attend a key.

        In training, SDPA's grouped-query attention; in inference, the query heads of a group are folded
        into the query length, so one matmul per K/V head and K/V are never repeated per head."""
        b, L, _ = x.shape
        hk, d = self.num_kv_heads, self.head_dim
        g = self.num_heads // hk
        q, k, v = self._qkv(x)
        k = k.reshape(b, L, hk, d).transpose(1, 2)
        v = v.reshape(b, L, hk, d).transpose(1, 2)
        past = cache.get_seq_length() if cache is not None else 0
        if cache is not None:
            k, v = cache.update_kv(self.layer_idx, k, v)
            if k.dtype != q.dtype:  # a cache kept in another dtype (an engine's float16 K/V)
                k, v = k.to(q.dtype), v.to(q.dtype)
        padded = getattr(cache, "pad_multiple", 1) > 1
        row_mask = getattr(cache, "row_attention_mask", None)
        if row_mask is not None:  # rows of different lengths in one batch (a server's slot cache)
            mask = row_mask(k.shape[2])
        elif attn_mask is None and past == 0 and not padded:
            mask = None  # causal over x alone
        else:
            mask = key_mask(attn_mask, past, L, k.shape[2], x.device, padded)
        if self.training or g == 1 or not inference_paths():
            q = q.reshape(b, L, self.num_heads, d).transpose(1, 2)
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=mask is None and L > 1,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=g > 1,
            )
            return self.o_proj(out.transpose(1, 2).reshape(b, L, -1))
        # fold: query head h = kv_head * g + j attends kv head `kv_head`; rows ordered (j, position)
        q = q.reshape(b, L, hk, g, d).permute(0, 2, 3, 1, 4).reshape(b, hk, g * L, d)
        if mask is None and L > 1:
            mask = key_mask(None, 0, L, L, x.device, padded=True)
        if mask is not None and L > 1:  # one query per group row: a (.., 1, keys) mask broadcasts
            mask = mask.repeat(1, 1, g, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.view(b, hk, g, L, d).permute(0, 3, 1, 2, 4).reshape(b, L, self.num_heads * d)
        return self.o_proj(out)


def key_mask(
    attn_mask: torch.Tensor | None, past: int, length: int, keys: int, device: torch.device, padded: bool
) -> torch.Tensor | None:
    """The boolean (b or 1, 1, L, keys) mask over `keys` >= past + L key slots, any tail being padding.

    `attn_mask` is what the model built for its cache: None (causal, or one query seeing every past key)
    or (b, 1, L, past + L). `padded`: the cache pads the key length; then a mask is always built, so the
    ops of a step do not depend on where in its block the length falls. None when every slot may be
    attended.
    """
    if attn_mask is not None:
        if not padded:
            return attn_mask
        out = torch.zeros(*attn_mask.shape[:-1], keys, dtype=torch.bool, device=device)
        out[..., : past + length] = attn_mask
        return out
    if length == 1 and not padded:
        return None
    q_pos = torch.arange(past, past + length, device=device)[:, None]
    k_pos = torch.arange(keys, device=device)[None, :]
    return (k_pos <= q_pos)[None, None]


def build_attention_mask(
    attention_mask: torch.Tensor | None, past: int, length: int, batch: int, device: torch.device
) -> torch.Tensor | None:
    """The boolean (b, 1, L, past + L) mask for SDPA, or None when plain causal attention is exact.

    `attention_mask` is the (b, past + L) 0/1 mask of real tokens (left padding = leading zeros). A query
    may attend to real keys at or before its own position; a padding query attends to itself only, so no
    row is fully masked (that would give NaN).
    """
    if attention_mask is None or bool(attention_mask.all()):
        if past == 0:
            return None
        if length == 1:
            return None  # one new query sees every past key: no mask needed
        key_valid = torch.ones(batch, past + length, dtype=torch.bool, device=device)
    else:
        key_valid = attention_mask.to(torch.bool)
    q_pos = torch.arange(past, past + length, device=device)[:, None]
    k_pos = torch.arange(past + length, device=device)[None, :]
    causal = k_pos <= q_pos
    allowed = causal[None] & key_valid[:, None, :]
    allowed = allowed | (k_pos == q_pos)[None]
    return allowed[:, None]
