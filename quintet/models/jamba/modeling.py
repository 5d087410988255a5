"""Jamba: a hybrid Transformer-Mamba language model with mixture-of-experts layers (arXiv 2403.19887).

Module and parameter names are those of `transformers`' `JambaForCausalLM`, so a state dict moves between
the two libraries unchanged (see `checkpoint.py`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from quintet.models.jamba.attention import JambaAttention, build_attention_mask
from quintet.models.jamba.cache import HybridCache
from quintet.models.jamba.configuration import JambaConfig
from quintet.models.jamba.mamba import JambaMambaMixer
from quintet.models.jamba.moe import JambaMLP, JambaSparseMoeBlock, load_balancing_loss
from quintet.models.jamba.norm import RMSNorm


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    cache: HybridCache | None = None
    router_logits: list[torch.Tensor] | None = None


class JambaDecoderLayer(nn.Module):
    """Pre-RMSNorm residual layer: attention or Mamba, then a dense MLP or a mixture of experts."""

    def __init__(self, config: JambaConfig, layer_idx: int):
        super().__init__()
        self.is_attention = config.layers_block_type[layer_idx] == "attention"
        self.is_moe = config.layers_num_experts[layer_idx] > 1
        if self.is_attention:
            self.self_attn = JambaAttention(config, layer_idx)
        else:
            self.mamba = JambaMambaMixer(config, layer_idx)
        self.feed_forward = JambaSparseMoeBlock(config, layer_idx) if self.is_moe else JambaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        token_mask: torch.Tensor | None,
        cache: HybridCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.input_layernorm(x)
        h = self.self_attn(h, attn_mask, cache) if self.is_attention else self.mamba(h, token_mask, cache)
        x, h = self.pre_ff_layernorm.add_and_norm(x, h)
        router_logits = None
        if self.is_moe:
            h, router_logits = self.feed_forward(h)
        else:
            h = self.feed_forward(h)
        return x + h, router_logits


class JambaModel(nn.Module):
    def __init__(self, config: JambaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(JambaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class JambaForCausalLM(nn.Module):
    """The Jamba language model: token ids in, next-token logits out.

    `forward(input_ids, attention_mask=None, cache=None, labels=None, ...)`:
      input_ids      (b, L) token ids of the new tokens.
      attention_mask (b, past + L), 1 for real tokens, 0 for padding; padding must be on the left.
      cache          a `HybridCache`; when given, it is read and advanced by L tokens.
      labels         (b, L) targets, -100 ignored; the loss is next-token cross entropy (labels shifted
                     inside, as in `transformers`), plus `router_aux_loss_coef * aux_loss` when the
                     router loss is requested.
    """

    def __init__(self, config: JambaConfig):
        super().__init__()
        self.config = config
        self.model = JambaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each layer's activations in backward (training)
        self.reset_parameters()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for projections and embeddings; Mamba's S4D-real A and
        log-uniform dt in [1e-3, 1e-1] through the dt_proj bias (the Mamba paper's initialisation)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, JambaMambaMixer):
                A = torch.arange(1, module.d_state + 1, dtype=torch.float32).expand(module.d_inner, -1)
                module.A_log.copy_(torch.log(A))
                module.D.fill_(1.0)
        for module in self.modules():
            if isinstance(module, JambaMambaMixer):
                dt = torch.exp(
                    torch.rand(module.d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)
                ).clamp(min=1e-4)
                module.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: HybridCache | None = None,
        labels: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        self._check_inputs(input_ids, attention_mask, cache)
        b, L = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        padded = attention_mask is not None and not bool(attention_mask.all())
        attn_mask = build_attention_mask(attention_mask, past, L, b, input_ids.device)
        token_mask = attention_mask[:, -L:] if padded else None

        x = self.model.embed_tokens(input_ids)
        all_router_logits = []
        recompute = self.gradient_checkpointing and self.training and cache is None
        for layer in self.model.layers:
            if recompute:
                x, router_logits = checkpoint(layer, x, attn_mask, token_mask, None, use_reentrant=False)
            else:
                x, router_logits = layer(x, attn_mask, token_mask, cache)
            if router_logits is not None:
                all_router_logits.append(router_logits)
        if cache is not None:
            cache.advance(L)
        x = self.model.final_layernorm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)

        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        aux_loss = None
        if output_router_logits and all_router_logits:
            aux_loss = load_balancing_loss(
                all_router_logits, self.config.num_experts, self.config.num_experts_per_tok, token_mask
            )
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss
        return CausalLMOutput(
            logits=logits,
            loss=loss,
            aux_loss=aux_loss,
            cache=cache,
            router_logits=all_router_logits if output_router_logits else None,
        )

    def _check_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: HybridCache | None
    ) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape (batch, length), got {tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids: empty input (length 0); give at least one token")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids: expected an integer tensor, got {input_ids.dtype}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        vocab = self.config.vocab_size
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            where = (input_ids == bad).nonzero()[0].tolist()
            raise ValueError(
                f"input_ids[{where[0]}, {where[1]}] = {bad}: token ids must be in [0, {vocab}) "
                f"(vocab_size = {vocab}); is the tokenizer the model's own?"
            )
        if attention_mask is not None:
            past = cache.get_seq_length() if cache is not None else 0
            want = (input_ids.shape[0], past + input_ids.shape[1])
            if tuple(attention_mask.shape) != want:
                raise ValueError(
                    f"attention_mask: shape {tuple(attention_mask.shape)}, expected (batch, past + length) "
                    f"= {want}"
                )

    def new_cache(self) -> HybridCache:
        return HybridCache(self.config)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
        from quintet.models.jamba.checkpoint import save_pretrained

        save_pretrained(self, directory, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> JambaForCausalLM:
        from quintet.models.jamba.checkpoint import load_pretrained

        return load_pretrained(cls, directory, dtype=dtype, device=device)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype
