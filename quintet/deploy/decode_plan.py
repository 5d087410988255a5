"""The engine's decode step in one native call, its weights bound once.

A decode step of a Jamba engine is some sixty kernel calls (M0E4 or float GEMVs, the fused Mamba step,
SwiGLU, residual + RMSNorm, attention over the cached keys), and making them from Python, with the small
PyTorch ops between them, cost about a third of a token's time. `DecodePlan` walks the fused model once and
hands its weights, layer by layer, to the kernel library's `DecodeProgram` (`quintet/kernels/csrc/
decode_step.cpp`), which then runs a whole step from C++: the same kernels the modules call, in the model's
own order (input norm, mixer, residual + norm, feed-forward, residual), with the caches updated in place.
The math stays written once, in `quintet.models.jamba` and the kernels; what the plan adds is the binding.
Attention is the program's own loop over the valid keys (the modules call PyTorch's SDPA): the logits agree
with the modules' within float32 rounding (tests), and a row's result does not depend on the rows beside it.

It runs decode steps (one new token for each of at most `gemv_max_rows()` rows: a generation, or a
server's batch of slots) on caches that give it their buffers (`decode_state`: the engine's
`SubTensorKVCache`, the server's slot rows), without tracing. Anything else, or a model it cannot bind
(layers not fused, weights it does not know, kernels not built), takes the modules. It rebinds when what
the kernels depend on changes (the instruction set chosen through the environment, the decode
activations).
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any

import torch

from quintet.deploy.fusions import EngineRMSNorm, FusedSwiGLU
from quintet.deploy.qlinear import M0E4Embedding
from quintet.kernels import selective_scan_cpu as scan
from quintet.kernels.m0e4_cpu import ISA_ENV, decode_binding, gemv_max_rows
from quintet.models.jamba import JambaForCausalLM
from quintet.models.jamba.moe import JambaSparseMoeBlock
from quintet.models.jamba.tracing import current_trace


class CannotBind(Exception):
    """The model holds a module the plan does not know how to bind: the modules run instead."""


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dtype != torch.float32:
        raise CannotBind
    return t.contiguous()


class _Builder:
    """Hands the fused model's weights to a `DecodeProgram`, layer by layer."""

    def __init__(self, program: Any):
        self.program = program

    def linear(self, module: Any) -> int:
        bias = _f32(module.bias)
        if hasattr(module, "qweight"):
            q, scales, offsets = module.qweight, module.scales, module.offsets
            return self.program.add_m0e4(q, scales, offsets, module.group_size, bias)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise CannotBind
        return self.program.add_float(_f32(weight), bias)

    def swiglu(self, ff: Any) -> tuple[int, int]:
        if not isinstance(ff, FusedSwiGLU):
            raise CannotBind
        gate_up, down = ff.gate_up_proj, ff.down_proj
        quantized = [hasattr(m, "qweight") for m in (gate_up, down)]
        if gate_up.bias is not None or down.bias is not None or quantized[0] != quantized[1]:
            raise CannotBind
        if quantized[0] and gate_up.group_size != down.group_size:
            raise CannotBind
        return self.linear(gate_up), self.linear(down)

    def feed_forward(self, ff: Any) -> None:
        if isinstance(ff, JambaSparseMoeBlock):
            router = self.linear(ff.router)
            pairs = [self.swiglu(e) for e in ff.experts]
            self.program.set_moe(router, [p[0] for p in pairs], [p[1] for p in pairs], ff.top_k)
        else:
            self.program.set_swiglu(*self.swiglu(ff))

    def mamba(self, mixer: Any) -> None:
        eps = {mixer.dt_layernorm.eps, mixer.b_layernorm.eps, mixer.c_layernorm.eps}
        if mixer.frozen_A is None or len(eps) != 1:  # the fused step has one eps
            raise CannotBind
        x_proj = getattr(mixer.x_proj, "weight", None)
        if not isinstance(x_proj, torch.Tensor):
            raise CannotBind
        d = mixer.d_inner
        self.program.set_mamba(
            self.linear(mixer.in_proj), self.linear(mixer.out_proj),
            _f32(mixer.conv1d.weight.reshape(d, -1)), _f32(mixer.conv1d.bias), _f32(x_proj),
            _f32(mixer.dt_layernorm.weight), _f32(mixer.b_layernorm.weight), _f32(mixer.c_layernorm.weight),
            float(mixer.dt_layernorm.eps), _f32(mixer.dt_proj.weight),
            _f32(mixer.dt_proj.bias), _f32(mixer.frozen_A), _f32(mixer.D),
        )  # fmt: skip

    def attention(self, attn: Any) -> None:
        if attn.qkv_proj is None:
            raise CannotBind
        d = attn.head_dim
        self.program.set_attention(
            self.linear(attn.qkv_proj), self.linear(attn.o_proj), attn.num_heads, attn.num_kv_heads, d,
            1.0 / math.sqrt(d),
        )  # fmt: skip

    def model(self, lm: JambaForCausalLM) -> None:
        norms = [lm.model.final_layernorm]
        for layer in lm.model.layers:
            norms += [layer.input_layernorm, layer.pre_ff_layernorm]
        if not all(isinstance(n, EngineRMSNorm) for n in norms):
            raise CannotBind
        for layer in lm.model.layers:
            a, b = layer.input_layernorm, layer.pre_ff_layernorm
            self.program.add_layer(_f32(a.weight), float(a.eps), _f32(b.weight), float(b.eps))
            if layer.is_attention:
                self.attention(layer.self_attn)
            else:
                self.mamba(layer.mamba)
            self.feed_forward(layer.feed_forward)
        embed = lm.model.embed_tokens
        if isinstance(embed, M0E4Embedding) and embed.out_dtype == torch.float32:
            self.program.set_embedding(embed.qweight, embed.scales, embed.offsets, embed.group_size)
        elif type(embed) is torch.nn.Embedding:
            self.program.set_embedding(_f32(embed.weight), None, None, 0)
        else:
            raise CannotBind
        final = lm.model.final_layernorm
        self.program.set_final(_f32(final.weight), float(final.eps), self.linear(lm.lm_head))


class DecodePlan:
    """`plan(input_ids, cache)`: the logits (rows, 1, vocab) of one new token per row, or None where the
    modules must run (see the module's docstring). Built from a fused `JambaForCausalLM` (the engine's)."""

    def __init__(self, lm: JambaForCausalLM):
        self.lm = lm
        self.key: tuple | None = None
        self.program: Any = None
        # (cache, its decode lists, activations, ISA setting, ids shape, K/V capacity) of the last step
        self._fast: tuple | None = None
        self._bound_lock = threading.Lock()
        layers = lm.model.layers
        self.mamba_layers = [i for i, layer in enumerate(layers) if not layer.is_attention]
        self.attention_layers = [i for i, layer in enumerate(layers) if layer.is_attention]

    def _bind(self, binding: tuple[Any, int, int, str]) -> None:
        _, code, float_code, activations = binding
        program = torch.classes.quintet_m0e4.DecodeProgram(code, float_code, activations == "int8")
        try:
            _Builder(program).model(self.lm)
        except CannotBind:
            program = None
        self.program = program

    def __call__(self, input_ids: torch.Tensor, cache, activations: str | None = None) -> torch.Tensor | None:
        """`activations`: of the M0E4 decode matmuls (the engine's); None: `decode_activations`' setting."""
        # the program holds one cache's buffers: one thread at a time binds them or steps with them
        with self._bound_lock:
            fast = self._fast
            if (
                fast is not None
                and cache is fast[0]
                and cache._decode_lists is fast[1]
                and activations == fast[2]
                and os.environ.get(ISA_ENV) == fast[3]
                and input_ids.shape == fast[4]
                and cache.seq_length < fast[5]
            ):
                # the same cache, buffers and binding as the step before: its buffers are bound in the program
                logits = self.program.step_bound(input_ids, cache.seq_length)
                cache.advance(1)
                return logits
            self._fast = None
        rows, length = input_ids.shape
        if cache is None or length != 1 or rows > gemv_max_rows() or current_trace() is not None:
            return None
        decode_state = getattr(cache, "decode_state", None)
        binding = decode_binding(activations)
        if decode_state is None or binding is None or scan._loader.get() is None:
            return None
        key = (id(binding[0]), *binding[1:])
        if key != self.key:
            self.key = key
            self._bind(binding)
        if self.program is None:
            return None
        state = decode_state(self.mamba_layers, self.attention_layers, rows)
        if state is None:
            return None  # no prompt yet, or buffers the program cannot write in place: the modules run
        logits = self.program.step(input_ids[:, 0], *state)
        cache.advance(1)
        kept = getattr(cache, "_decode_lists", None)
        if activations is not None and kept is not None and kept[3] is not None:
            # the Python around a step runs right after the kernels streamed every weight through the
            # caches, cold: on this cache, while nothing changes, the next steps skip it (its buffers bound)
            env = os.environ.get(ISA_ENV)
            with self._bound_lock:
                self.program.bind_state(*state[:4])
                self._fast = (cache, kept, activations, env, tuple(input_ids.shape), kept[3][4])
        return logits.unsqueeze(1)
