"""Feed-forward layers of Jamba: the dense SwiGLU MLP and the sparse mixture of experts.

Routing (as in Jamba and `transformers`): softmax over all experts in float32, keep the top-k
probabilities as they are (NOT renormalised to sum to one, unlike Mixtral). Dispatch sorts the
(token, slot) pairs by expert so that each expert runs once, on exactly the tokens routed to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quintet.models.jamba.configuration import JambaConfig


class JambaMLP(nn.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`."""

    def __init__(self, config: JambaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class JambaSparseMoeBlock(nn.Module):
    """Top-k mixture of SwiGLU experts. Returns `(output, router_logits)`, logits (tokens, experts)."""

    def __init__(self, config: JambaConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(JambaMLP(config) for _ in range(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        router_logits = self.router(x)
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        weights = weights.to(x.dtype)
        if x.shape[0] == 1 and not self.training:  # one token (decoding): no sorting, just its k experts
            out = sum(w * self.experts[e](x) for w, e in zip(weights[0], experts[0].tolist(), strict=True))
            return out.reshape(shape), router_logits

        flat_experts = experts.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        token_of = order // self.top_k  # source token of each sorted (token, slot) pair
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        routed = x.index_select(0, token_of)
        expert_out = torch.empty_like(routed)
        start = 0
        for expert, count in zip(self.experts, counts, strict=True):
            if count:
                expert_out[start : start + count] = expert(routed[start : start + count])
            start += count
        expert_out = expert_out * weights.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(x).index_add_(0, token_of, expert_out)
        idle = [
            p
            for expert, count in zip(self.experts, counts, strict=True)
            if not count
            for p in expert.parameters()
        ]
        if idle and torch.is_grad_enabled():
            # Experts that got no token still join the graph with a zero gradient, so every process of a
            # data-parallel run (DDP, FSDP2) reduces the same set of gradients whatever its tokens chose.
            out = out + 0.0 * sum(p.sum() for p in idle)
        return out.reshape(shape), router_logits


def load_balancing_loss(
    router_logits: list[torch.Tensor], num_experts: int, top_k: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-Transformer auxiliary loss, `E * sum_e f_e * P_e`, pooled over all MoE layers.

    f_e: fraction of (token, slot) assignments routed to expert e, times k (so the f_e sum to k);
    P_e: mean router probability of expert e. Padding tokens (token_mask == 0) are left out.
    router_logits: one (tokens, experts) tensor per MoE layer, tokens = batch * length.
    """
    counts = router_logits[0].new_zeros(num_experts, dtype=torch.float32)
    prob_sum = router_logits[0].new_zeros(num_experts, dtype=torch.float32)
    rows = router_logits[0].new_zeros((), dtype=torch.float32)
    mask = None if token_mask is None else token_mask.reshape(-1).to(torch.float32)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices
        one_hot = F.one_hot(chosen, num_experts).to(torch.float32).sum(1)  # (tokens, experts)
        if mask is not None:
            one_hot = one_hot * mask[:, None]
            probs = probs * mask[:, None]
            rows = rows + mask.sum()
        else:
            rows = rows + probs.shape[0]
        counts = counts + one_hot.sum(0)
        prob_sum = prob_sum + probs.sum(0)
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))
