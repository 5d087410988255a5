"""Grouped-query causal self-attention with PyTorch SDPA and no positional encoding (Jamba has none)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quintet.models.jamba.cache import HybridCache
from quintet.models.jamba.configuration import JambaConfig


class JambaAttention(nn.Module):
    """q/k/v/o projections without bias; `num_key_value_heads` K/V heads shared by groups of queries."""

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

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, cache: HybridCache | None = None
    ) -> torch.Tensor:
        """x: (b, L, hidden). attn_mask: None for plain causal attention over x alone, else a boolean
        (b, 1, L, past + L) mask, True where a query may attend a key."""
        b, L, _ = x.shape
        q = self.q_proj(x).view(b, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update_kv(self.layer_idx, k, v)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=attn_mask is None and L > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, L, -1))


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
