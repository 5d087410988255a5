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
from quintet.models.jamba.tracing import current_trace


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

    def __init__(self, config: JambaConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
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
        trace = current_trace()
        if x.shape[0] == 1 and not self.training:  # one token (decoding): no sorting, just its k experts
            if trace is None:  # one read of the k chosen experts: only their weights are touched
                chosen, scale = experts[0].tolist(), weights[0].tolist()
            else:
                chosen, scale = trace.decode_experts(self.layer_idx, experts), weights[0].unbind()
            out = None
            for e, w in zip(chosen, scale, strict=True):
                y = self.experts[e](x) * w
                out = y if out is None else out + y
            return out.reshape(shape), router_logits

        flat_experts = experts.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        token_of = order // self.top_k  # source token of each sorted (token, slot) pair
        if trace is None:
            counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        else:
            counts = trace.expert_counts(self.layer_idx, flat_experts, self.num_experts)
        # every expert runs, on no rows when no token chose it: its parameters still join the graph (with a
        # zero gradient), so every process of a data-parallel run reduces the same set of gradients
        pieces = x.index_select(0, token_of).split(counts)
        expert_out = torch.cat([expert(p) for expert, p in zip(self.experts, pieces, strict=True)])
        expert_out = expert_out * weights.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(x).index_add_(0, token_of, expert_out)
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
