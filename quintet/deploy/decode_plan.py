"""The engine's one-token decode step as a list of kernel calls with their weights bound.

A decode step of a Jamba engine is some sixty kernel calls (M0E4 or float GEMVs, the fused Mamba step,
SwiGLU, residual + RMSNorm), and running them through the modules costs more Python than the kernels
take: every module call, attribute lookup, dtype/device/grad check and environment read, at every layer
of every token. `DecodePlan` walks the fused model once and keeps, per layer, the kernel calls the
modules would make with their weights already bound, so that a step is the calls alone, in the model's
own order: input norm, mixer (the fused Mamba step, or the model's attention module), residual + norm,
feed-forward (the SwiGLU kernel, or the MoE router, top-k and the chosen experts' SwiGLU), residual.

It makes exactly the calls the modules make (the same kernels on the same arguments: the tests check
bit-for-bit equality with the module path), so the math is still written once, in `quintet.models.jamba`
and the kernels; what the plan adds is only the binding. It runs one row (batch 1) of one new token
without tracing; anything else, or a model it cannot bind (layers not fused, weights it does not know,
kernels not built), takes the modules. It rebinds when what the calls depend on changes (the kernels'
instruction set from the environment, the decode activations).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from quintet.deploy.fusions import EngineRMSNorm, FusedSwiGLU
from quintet.kernels import selective_scan_cpu as scan
from quintet.kernels.m0e4_cpu import bind_add_rms_norm, bind_linear, bind_swiglu, decode_binding
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
    top_k = ff.top_k

    def moe(h: torch.Tensor) -> torch.Tensor:  # JambaSparseMoeBlock.forward's one-token path
        probs = torch.softmax(router(h), dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, top_k, dim=-1)
        out = None
        for e, w in zip(chosen[0].tolist(), weights[0].tolist(), strict=True):
            y = experts[e](h) * w
            out = y if out is None else out + y
        return out

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
    """`plan(input_ids, cache)`: the logits (1, 1, vocab) of one new token, or None where the modules must
    run (see the module's docstring). Built from a fused `JambaForCausalLM` (the engine's)."""

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

    def __call__(self, input_ids: torch.Tensor, cache: HybridCache | None) -> torch.Tensor | None:
        if not isinstance(cache, HybridCache) or input_ids.shape != (1, 1) or current_trace() is not None:
            return None
        if getattr(cache, "row_attention_mask", None) is not None:
            return None  # a server's slot cache: rows of their own lengths
        binding = decode_binding()
        if binding is None:
            return None
        key = (id(binding[0]), *binding[1:], scan._loader.get() is not None)
        if key != self.key:
            self.key = key
            self._bind(binding)
        if self.layers is None or scan._loader.get() is None:
            return None
        states = cache.conv_states, cache.ssm_states
        if any(states[0][i] is None or states[1][i] is None for i in self.mamba_layers):
            return None  # no prompt yet: the modules run the first step
        x = self.lm.model.embed_tokens(input_ids)[0]
        if x.dtype != torch.float32 or x.requires_grad:
            return None
        for layer in self.layers:
            x = layer(x, cache)
        cache.advance(1)
        return self.head(self.final(x, None)[1]).unsqueeze(0)
