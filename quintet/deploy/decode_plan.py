"""The engine's decode step as a list of kernel calls with their weights bound.

A decode step of a Jamba engine is some sixty kernel calls (M0E4 or float GEMVs, the fused Mamba step,
SwiGLU, residual + RMSNorm), and running them through the modules costs more Python than the kernels
take: every module call, attribute lookup, dtype/device/grad check and environment read, at every layer
of every token. `DecodePlan` walks the fused model once and keeps, per layer, the kernel calls the
modules would make with their weights already bound, so that a step is the calls alone, in the model's
own order: input norm, mixer (the fused Mamba step, or the model's attention module), residual + norm,
feed-forward (the SwiGLU kernel, or the MoE router, top-k and the chosen experts' SwiGLU), residual.

It makes exactly the calls the modules make (the same kernels on the same arguments: the tests check
bit-for-bit equality with the module path), so the math is still written once, in `quintet.models.jamba`
and the kernels; what the plan adds is only the binding. It runs decode steps (one new token for each of
at most `gemv_max_rows()` rows: a generation, or a server's batch of slots) without tracing. Anything
else, or a model it cannot bind (layers not fused, weights it does not know, kernels not built), takes
the modules. It rebinds when what the calls depend on changes (the instruction set chosen through the
environment, the decode activations).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from quintet.deploy.fusions import EngineRMSNorm, FusedSwiGLU
from quintet.kernels import selective_scan_cpu as scan
from quintet.kernels.m0e4_cpu import (
    bind_add_rms_norm,
    bind_linear,
    bind_swiglu,
    decode_binding,
    gemv_max_rows,
)
from quintet.models.jamba import JambaForCausalLM
from quintet.models.jamba.cache import HybridCache
from quintet.models.jamba.moe import JambaSparseMoeBlock
from quintet.models.jamba.tracing import current_trace

Step = Callable[[torch.Tensor, HybridCache], torch.Tensor]


class CannotBind(Exception):
    """The model holds a module the plan does not know how to bind: the modules run instead."""


def _need(call):
    if call is None:
        raise CannotBind
    return call


def _norm(norm, binding):
    if not isinstance(norm, EngineRMSNorm):
        raise CannotBind
    return _need(bind_add_rms_norm(norm.weight, norm.eps, binding))


def _feed_forward(ff, binding) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(ff, FusedSwiGLU):
        return _need(bind_swiglu(ff.gate_up_proj, ff.down_proj, binding))
    if not isinstance(ff, JambaSparseMoeBlock):
        raise CannotBind
    router = _need(bind_linear(ff.router, binding))
    experts = [_feed_forward(e, binding) for e in ff.experts]
    top_k, n_experts = ff.top_k, ff.num_experts

    def moe(h: torch.Tensor) -> torch.Tensor:  # JambaSparseMoeBlock.forward's decode paths, op for op
        probs = torch.softmax(router(h), dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, top_k, dim=-1)
        if h.shape[0] == 1:  # one token: its k experts
            out = None
            for e, w in zip(chosen[0].tolist(), weights[0].tolist(), strict=True):
                y = experts[e](h) * w
                out = y if out is None else out + y
            return out
        flat = chosen.reshape(-1)  # a few rows: each expert once, on the rows routed to it
        order = torch.argsort(flat, stable=True)
        token_of = order // top_k
        counts = torch.bincount(flat, minlength=n_experts).tolist()
        pieces = h.index_select(0, token_of).split(counts)
        out = torch.cat([experts[e](p) if len(p) else p for e, p in enumerate(pieces)])
        out = out * weights.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros_like(h).index_add_(0, token_of, out)

    return moe


def _mamba(mixer, binding) -> Step:
    if mixer.frozen_A is None:
        raise CannotBind
    in_proj = _need(bind_linear(mixer.in_proj, binding))
    out_proj = _need(bind_linear(mixer.out_proj, binding))
    x_proj = mixer.x_proj.weight
    if x_proj.dtype != torch.float32:
        raise CannotBind
    step = _need(
        scan.bind_mixer_step(
            mixer.conv1d.weight, mixer.conv1d.bias, x_proj, mixer.dt_layernorm.weight,
            mixer.b_layernorm.weight, mixer.c_layernorm.weight, mixer.dt_layernorm.eps,
            mixer.dt_proj.weight, mixer.dt_proj.bias, mixer.A_log, mixer.D, mixer.frozen_A,
        )
    )  # fmt: skip
    idx = mixer.layer_idx

    def run(h: torch.Tensor, cache: HybridCache) -> torch.Tensor:  # JambaMambaMixer._fused_step
        conv_state, ssm_state = cache.mamba_state(idx)
        y, conv_state, ssm_state = step(in_proj(h), conv_state, ssm_state)
        cache.set_mamba_state(idx, conv_state, ssm_state)
        return out_proj(y)

    return run


def _layer(layer, binding) -> Step:
    norm_in = _norm(layer.input_layernorm, binding)
    add_norm = _norm(layer.pre_ff_layernorm, binding)
    ff = _feed_forward(layer.feed_forward, binding)
    if layer.is_attention:
        attention = layer.self_attn

        def mix(h: torch.Tensor, cache: HybridCache) -> torch.Tensor:
            return attention(h.unsqueeze(1), None, cache)[:, 0]

    else:
        mix = _mamba(layer.mamba, binding)

    def run(x: torch.Tensor, cache: HybridCache) -> torch.Tensor:  # JambaDecoderLayer.forward
        h = mix(norm_in(x, None)[1], cache)
        x, h = add_norm(x, h)
        return x + ff(h)

    return run


class DecodePlan:
    """`plan(input_ids, cache)`: the logits (rows, 1, vocab) of one new token per row, or None where the
    modules must run (see the module's docstring). Built from a fused `JambaForCausalLM` (the engine's)."""

    def __init__(self, lm: JambaForCausalLM):
        self.lm = lm
        self.key: tuple | None = None
        self.layers: list[Step] | None = None
        self.mamba_layers = [i for i, layer in enumerate(lm.model.layers) if not layer.is_attention]

    def _bind(self, binding) -> None:
        model = self.lm.model
        try:
            layers = [_layer(layer, binding) for layer in model.layers]
            final = _norm(model.final_layernorm, binding)
            head = _need(bind_linear(self.lm.lm_head, binding))
        except CannotBind:
            self.layers = None
            return
        self.layers, self.final, self.head = layers, final, head

    def __call__(self, input_ids: torch.Tensor, cache) -> torch.Tensor | None:
        rows, length = input_ids.shape
        if cache is None or length != 1 or rows > gemv_max_rows() or current_trace() is not None:
            return None
        binding = decode_binding()
        if binding is None:
            return None
        key = (id(binding[0]), *binding[1:], scan._loader.get() is not None)
        if key != self.key:
            self.key = key
            self._bind(binding)
        if self.layers is None or scan._loader.get() is None:
            return None
        for i in self.mamba_layers:
            conv_state, ssm_state = cache.mamba_state(i)
            if conv_state is None or ssm_state is None:
                return None  # no prompt yet: the modules run the first step
        x = self.lm.model.embed_tokens(input_ids)[:, 0]
        if x.dtype != torch.float32 or x.requires_grad:
            return None
        for layer in self.layers:
            x = layer(x, cache)
        cache.advance(1)
        return self.head(self.final(x, None)[1]).unsqueeze(1)
