"""The hybrid inference cache of a Jamba model.

Attention layers keep keys and values for every past token, (b, kv_heads, T, head_dim). Mamba layers keep
a state whose size does not depend on the context length: the last `d_conv - 1` inputs of the causal
convolution, (b, d_inner, d_conv - 1), and the SSM state, (b, d_inner, d_state) in float32.
"""

from __future__ import annotations

import torch

from quintet.models.jamba.configuration import JambaConfig


class HybridCache:
    """Per-layer K/V for attention layers and conv + SSM state for Mamba layers."""

    def __init__(self, config: JambaConfig):
        self.config = config
        n = config.num_hidden_layers
        self.keys: list[torch.Tensor | None] = [None] * n
        self.values: list[torch.Tensor | None] = [None] * n
        self.conv_states: list[torch.Tensor | None] = [None] * n
        self.ssm_states: list[torch.Tensor | None] = [None] * n
        self.seq_length = 0

    def get_seq_length(self) -> int:
        """Tokens already processed (the past length)."""
        return self.seq_length

    def update_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's K/V of attention layer `layer`; return K/V over the whole context."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def mamba_state(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.conv_states[layer], self.ssm_states[layer]

    def set_mamba_state(self, layer: int, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> None:
        self.conv_states[layer], self.ssm_states[layer] = conv_state, ssm_state

    def advance(self, num_tokens: int) -> None:
        """Called by the model once every layer has seen `num_tokens` new tokens."""
        self.seq_length += num_tokens

    def nbytes(self) -> dict[str, int]:
        """Bytes held now: `kv` for attention layers, `mamba` for conv + SSM states."""
        kv = sum(t.nbytes for t in self.keys + self.values if t is not None)
        mamba = sum(t.nbytes for t in self.conv_states + self.ssm_states if t is not None)
        return {"kv": kv, "mamba": mamba}
