"""The deployment engine for Jamba: FP4 (M0E4) weights multiplied as stored, a sub-tensor KV cache, fusions.

    engine = load_quantized("runs/jamba-fp4")          # a folder written by `quantize_folder`
    generate(engine, prompts, max_new_tokens=32)         # quintet.generation works on it unchanged

`JambaEngine` wraps a `JambaForCausalLM` whose modules were swapped (module swaps only; the model's own
forward runs):
- M0E4 Linear / Embedding (`qlinear.py`): 4-bit weights, multiplied by quintet's M0E4 kernels (a register
  GEMV for decode, dequantized tiles in a reused scratch buffer for prefill; `quintet.kernels.m0e4_cpu`);
- `EngineDecoderLayer`: the decoder layer with merged q/k/v, merged gate/up SwiGLU and residual + RMSNorm
  fused (`fusions.py`);
- `EngineAttention`: attention over the views a `SubTensorKVCache` returns, padded to a multiple of 64 and
  masked; grouped-query attention by folding the query heads of a group into the query length (so K/V are
  never repeated per head).
`to_engine` builds the same engine on an unquantized model (the float baseline).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quintet.deploy.fusions import FusedSwiGLU, add_rms_norm, merge_linears, rms_norm, use_engine_linears
from quintet.deploy.kv_cache import SubTensorKVCache
from quintet.deploy.qlinear import M0E4Embedding, M0E4Linear
from quintet.deploy.quantize import (
    QuantizedCheckpointError,
    build_skeleton,
    dequantize_model,
    load_quantized_state,
    read_config,
    swap_to_m0e4,
)
from quintet.kernels import selective_scan_cpu as fused_scan
from quintet.kernels.m0e4_cpu import decode_activations, gemv_max_rows, matmul_dtype, matmul_path
from quintet.models.jamba import JambaConfig, JambaForCausalLM
from quintet.models.jamba.attention import JambaAttention
from quintet.models.jamba.mamba import JambaMambaMixer
from quintet.models.jamba.modeling import CausalLMOutput, JambaDecoderLayer
from quintet.models.jamba.moe import JambaMLP, JambaSparseMoeBlock

DEFAULT_MAX_CACHE = 4096
DEFAULT_PAD = 64


# ---------------------------------------------------------------------------------------------- attention
def engine_attention_mask(
    attn_mask: torch.Tensor | None, past: int, length: int, keys: int, device: torch.device, padded: bool
) -> torch.Tensor | None:
    """The boolean (b or 1, 1, L, keys) mask over `keys` >= past + L key slots, the tail being padding.

    `attn_mask` is what the model built for its own cache: None (plain causal, or one query seeing every
    past key) or (b, 1, L, past + L). `padded`: the cache pads the key length (then a mask is always
    built, so the ops of a step do not depend on where in its block of 64 the length falls). Returns None
    when every slot may be attended.
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


class EngineAttention(nn.Module):
    """JambaAttention over a sub-tensor cache: merged q/k/v, GQA by folding, padded keys masked."""

    def __init__(self, attn: JambaAttention, merge: bool = True):
        super().__init__()
        self.layer_idx = attn.layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.groups = self.num_heads // self.num_kv_heads
        self.splits = [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2
        if merge:
            self.qkv_proj: nn.Module | None = merge_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        else:
            self.qkv_proj = None
            self.q_proj, self.k_proj, self.v_proj = attn.q_proj, attn.k_proj, attn.v_proj
        self.o_proj = attn.o_proj

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, cache=None) -> torch.Tensor:
        b, L, _ = x.shape
        hk, g, d = self.num_kv_heads, self.groups, self.head_dim
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.splits, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # fold: query head h = kv_head * g + j attends kv head `kv_head`; rows ordered (j, position)
        q = q.reshape(b, L, hk, g, d).permute(0, 2, 3, 1, 4).reshape(b, hk, g * L, d)
        k = k.reshape(b, L, hk, d).transpose(1, 2)
        v = v.reshape(b, L, hk, d).transpose(1, 2)
        past = cache.get_seq_length() if cache is not None else 0
        if cache is not None:
            k, v = cache.update_kv(self.layer_idx, k, v)
        row_mask = getattr(cache, "row_attention_mask", None)
        if row_mask is not None:  # rows of different lengths in one batch (quintet.serve's slots)
            mask = row_mask(k.shape[2])
        else:
            padded = getattr(cache, "pad_multiple", 1) > 1
            mask = engine_attention_mask(attn_mask, past, L, k.shape[2], x.device, padded)
        if mask is not None and g > 1 and L > 1:  # one query per group row: a (.., 1, keys) mask broadcasts
            mask = mask.repeat(1, 1, g, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.view(b, hk, g, L, d).permute(0, 3, 1, 2, 4).reshape(b, L, self.num_heads * d)
        return self.o_proj(out)


# ---------------------------------------------------------------------------------------------- tracing hooks
class TraceHooks:
    """What the engine asks when its shapes are being traced (see `shapes.py`): the data-dependent values
    (which experts, how many tokens each) and whether opaque kernels run as single registered ops."""

    def expert_counts(self, layer: int, flat_experts: torch.Tensor, num_experts: int) -> list:
        raise NotImplementedError

    def decode_experts(self, layer: int, experts: torch.Tensor) -> list:
        raise NotImplementedError


_TRACE: ContextVar[TraceHooks | None] = ContextVar("quintet_deploy_trace", default=None)


@contextlib.contextmanager
def tracing(hooks: TraceHooks) -> Iterator[None]:
    token = _TRACE.set(hooks)
    try:
        yield
    finally:
        _TRACE.reset(token)


@torch.library.custom_op("quintet_deploy::selective_scan", mutates_args=())
def _scan_op(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor,
    delta_bias: torch.Tensor,
    initial_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    y, state = fused_scan.selective_scan_fused(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, initial_state=initial_state
    )
    return y.clone() if y is u else y, state


@_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state):
    return torch.empty_like(u), u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)


@torch.library.custom_op("quintet_deploy::state_update", mutates_args=())
def _state_update_op(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor,
    delta_bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return fused_scan.selective_state_update_fused(
        state, u, delta, A, B, C, D, z, delta_bias, delta_softplus=True
    )


@_state_update_op.register_fake
def _(state, u, delta, A, B, C, D, z, delta_bias):
    return torch.empty_like(u), torch.empty_like(state)


# ---------------------------------------------------------------------------------------------- mamba, MoE
class EngineMamba(nn.Module):
    """The Mamba mixer with its constants (A = -exp(A_log), D, dt bias) computed once, fused RMSNorms, a
    one-token decode step (the conv as a dot product with the cached window, the fused state-update
    kernel) and the fused scan for prompts. Same math as `JambaMambaMixer`, left padding included."""

    def __init__(self, mixer: JambaMambaMixer):
        super().__init__()
        self.mixer = mixer
        self.layer_idx, self.d_inner, self.d_conv = mixer.layer_idx, mixer.d_inner, mixer.d_conv
        self.splits = [mixer.dt_rank, mixer.d_state, mixer.d_state]
        with torch.no_grad():
            f32 = lambda t: t.detach().to(torch.float32)  # noqa: E731 (a float32 parameter itself: no copy)
            self.register_buffer("A", -torch.exp(f32(mixer.A_log)), persistent=False)
            self.register_buffer("D", f32(mixer.D), persistent=False)
            self.register_buffer("dt_bias", f32(mixer.dt_proj.bias), persistent=False)
            # dt, B and C are small: normalised and projected in float32 whatever the activations are
            self.register_buffer("dt_w", f32(mixer.dt_proj.weight), persistent=False)
            self.register_buffer("dt_norm_w", f32(mixer.dt_layernorm.weight), persistent=False)
            self.register_buffer("b_norm_w", f32(mixer.b_layernorm.weight), persistent=False)
            self.register_buffer("c_norm_w", f32(mixer.c_layernorm.weight), persistent=False)
            # For the fused decode step (quintet.kernels.mamba_mixer_step_fused), the small tensors it
            # reads in float32. It needs x_proj in float: a folder that quantized x_proj (quantize keeps it
            # in float since it is skipped by default) decodes unfused, x_proj through the M0E4 kernel.
            xp = mixer.x_proj
            x_proj_w = None if isinstance(xp, M0E4Linear) else f32(xp.weight).contiguous()
            self.register_buffer("x_proj_w", x_proj_w, persistent=False)
            self.register_buffer(
                "conv_w", f32(mixer.conv1d.weight).reshape(self.d_inner, -1), persistent=False
            )
            bias = mixer.conv1d.bias
            self.register_buffer("conv_b", None if bias is None else f32(bias), persistent=False)
            self.register_buffer("A_log", f32(mixer.A_log), persistent=False)
        self.eps = (mixer.dt_layernorm.eps, mixer.b_layernorm.eps, mixer.c_layernorm.eps)
        # the kernel takes one eps for the three norms, and x_proj in float
        self.fused_step = len(set(self.eps)) == 1 and self.x_proj_w is not None

    def _scan(self, *args) -> tuple[torch.Tensor, torch.Tensor]:
        if _TRACE.get() is not None:
            return _scan_op(*args)
        u, delta, A, B, C, D, z, bias, state = args
        return fused_scan.selective_scan_fused(
            u, delta, A, B, C, D, z, bias, delta_softplus=True, initial_state=state
        )

    def _step(self, *args) -> tuple[torch.Tensor, torch.Tensor]:
        if _TRACE.get() is not None:
            return _state_update_op(*args)
        return fused_scan.selective_state_update_fused(*args, delta_softplus=True)

    def _dbc(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dt (after dt_proj, bias left to the scan), B, C from x, in float32."""
        dt, B, C = self.mixer.x_proj(x).float().split(self.splits, dim=-1)
        e_dt, e_b, e_c = self.eps
        dt = F.linear(F.rms_norm(dt, (dt.shape[-1],), self.dt_norm_w, e_dt), self.dt_w)
        B = F.rms_norm(B, (B.shape[-1],), self.b_norm_w, e_b)
        return dt, B, F.rms_norm(C, (C.shape[-1],), self.c_norm_w, e_c)

    def forward(self, h: torch.Tensor, token_mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        m = self.mixer
        conv_state, ssm_state = cache.mamba_state(self.layer_idx) if cache is not None else (None, None)
        b, L, _ = h.shape
        if L == 1 and ssm_state is not None:  # decode: new tokens are never padding
            xz = m.in_proj(h.select(1, 0))
            if self.fused_step and _TRACE.get() is None and fused_scan.fused_scan_available():
                # conv, SiLU, x_proj, norms, dt_proj and the SSM step in one kernel call, in float32
                y, new_conv, new_state = fused_scan.mamba_mixer_step_fused(
                    xz.float(), conv_state.float(), self.conv_w, self.conv_b, self.x_proj_w,
                    self.dt_norm_w, self.b_norm_w, self.c_norm_w, self.eps[0], self.dt_w, self.dt_bias,
                    self.A_log, self.D, ssm_state, A=self.A,
                )  # fmt: skip
                cache.set_mamba_state(self.layer_idx, new_conv.to(conv_state.dtype), new_state)
                return m.out_proj(y.to(xz.dtype)).unsqueeze(1)
            x, z = xz.split(self.d_inner, dim=-1)  # (b, d_inner) each
            window = torch.cat([conv_state, x.unsqueeze(-1)], dim=-1)  # (b, d_inner, d_conv); same dtype
            x = torch.linalg.vecdot(window, m.conv1d.weight[:, 0])
            x = F.silu(x if m.conv1d.bias is None else x + m.conv1d.bias)
            dt, B, C = self._dbc(x)
            y, new_state = self._step(ssm_state, x, dt, self.A, B, C, self.D, z, self.dt_bias)
            cache.set_mamba_state(self.layer_idx, window[..., 1:], new_state)
            return m.out_proj(y).unsqueeze(1)
        x, z = m.in_proj(h).split(self.d_inner, dim=-1)  # (b, L, d_inner) each
        if token_mask is not None:
            x = x * token_mask.unsqueeze(-1).to(x.dtype)
        x = x.transpose(1, 2)
        if conv_state is None:
            conv_state = x.new_zeros(b, self.d_inner, self.d_conv - 1)
        window = torch.cat([conv_state.to(x.dtype), x], dim=-1)  # (b, d_inner, d_conv - 1 + L)
        x = F.silu(F.conv1d(window, m.conv1d.weight, m.conv1d.bias, groups=self.d_inner))
        if token_mask is not None:
            x = x * token_mask.unsqueeze(1).to(x.dtype)
        dt, B, C = self._dbc(x.transpose(1, 2))
        y, new_state = self._scan(
            x,
            dt.transpose(1, 2),
            self.A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            self.D,
            z.transpose(1, 2),
            self.dt_bias,
            ssm_state,
        )
        if cache is not None:
            cache.set_mamba_state(
                self.layer_idx, window[..., window.shape[-1] - (self.d_conv - 1) :], new_state
            )
        return m.out_proj(y.transpose(1, 2))


class EngineMoE(nn.Module):
    """The MoE block: the model's routing (router and softmax over experts in float32, top-k, weights not
    renormalised) and sorted dispatch; one token reads its k experts once (`tolist`)."""

    def __init__(self, block: JambaSparseMoeBlock, layer_idx: int):
        super().__init__()
        self.block, self.layer_idx = block, layer_idx
        router = block.router
        weight = router.dequantized_weight() if isinstance(router, M0E4Linear) else router.weight.detach()
        self.register_buffer("router_w", weight.to(torch.float32), persistent=False)  # float32, shared if so

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blk, trace = self.block, _TRACE.get()
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        router_logits = F.linear(x.float(), self.router_w)
        probs = torch.softmax(router_logits, dim=-1)
        weights, experts = torch.topk(probs, blk.top_k, dim=-1)
        weights = weights.to(x.dtype)
        if x.shape[0] == 1:
            chosen = experts[0].tolist() if trace is None else trace.decode_experts(self.layer_idx, experts)
            scale = weights[0].tolist() if trace is None else weights[0].unbind()
            out = None
            for e, w in zip(chosen, scale, strict=True):
                y = blk.experts[e](x) * w
                out = y if out is None else out + y
            return out.view(shape), router_logits
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_of = order // blk.top_k  # source token of each (token, slot) pair, sorted by expert
        if trace is None:
            counts = torch.bincount(flat, minlength=blk.num_experts).tolist()
        else:
            counts = trace.expert_counts(self.layer_idx, flat, blk.num_experts)
        pieces = x.index_select(0, token_of).split(counts)
        expert_out = torch.cat([expert(p) for expert, p in zip(blk.experts, pieces, strict=True)])
        expert_out = expert_out * weights.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(x).index_add_(0, token_of, expert_out)
        return out.view(shape), router_logits


# ---------------------------------------------------------------------------------------------- layers
def _fuse_feed_forward(ff: nn.Module) -> nn.Module:
    if isinstance(ff, JambaMLP):
        return FusedSwiGLU(ff.gate_proj, ff.up_proj, ff.down_proj)
    if isinstance(ff, JambaSparseMoeBlock):
        for i, expert in enumerate(ff.experts):
            ff.experts[i] = FusedSwiGLU(expert.gate_proj, expert.up_proj, expert.down_proj)
    return ff


class EngineDecoderLayer(nn.Module):
    """JambaDecoderLayer with the engine's attention, fused SwiGLU and fused residual + RMSNorm."""

    def __init__(self, layer: JambaDecoderLayer, layer_idx: int, fuse: bool = True):
        super().__init__()
        self.is_attention, self.is_moe, self.fuse = layer.is_attention, layer.is_moe, fuse
        if self.is_attention:
            self.self_attn = EngineAttention(layer.self_attn, merge=fuse)
        else:
            self.mamba = EngineMamba(layer.mamba) if fuse else layer.mamba
        ff = _fuse_feed_forward(layer.feed_forward) if fuse else layer.feed_forward
        self.feed_forward = EngineMoE(ff, layer_idx) if fuse and self.is_moe else ff
        self.input_layernorm = layer.input_layernorm
        self.pre_ff_layernorm = layer.pre_ff_layernorm

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, token_mask: torch.Tensor | None, cache
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        norm1, norm2 = self.input_layernorm, self.pre_ff_layernorm
        h = rms_norm(x, norm1.weight, norm1.eps) if self.fuse else norm1(x)
        h = self.self_attn(h, attn_mask, cache) if self.is_attention else self.mamba(h, token_mask, cache)
        if self.fuse:
            x, h = add_rms_norm(x, h, norm2.weight, norm2.eps)
        else:
            x = x + h
            h = norm2(x)
        router_logits = None
        if self.is_moe:
            h, router_logits = self.feed_forward(h)
        else:
            h = self.feed_forward(h)
        return x + h, router_logits


# ---------------------------------------------------------------------------------------------- engine
class JambaEngine(nn.Module):
    """A Jamba model prepared for inference; usable wherever a `JambaForCausalLM` is generated from.

    `new_cache()` gives a `SubTensorKVCache` of `max_cache_length` tokens, padded to `pad_multiple`.
    """

    def __init__(
        self,
        lm: JambaForCausalLM,
        dtype: torch.dtype = torch.float32,
        fuse: bool = True,
        max_cache_length: int = DEFAULT_MAX_CACHE,
        pad_multiple: int = DEFAULT_PAD,
        quantization_config: dict | None = None,
        activations: str = "float32",
    ):
        super().__init__()
        if activations not in ("float32", "int8"):
            raise ValueError(f"activations = {activations!r}: must be float32 or int8")
        self.activations = activations  # of the FP4 decode matmuls (see m0e4_cpu.decode_activations)
        for i, layer in enumerate(lm.model.layers):  # first: engine layers keep float32 copies they need
            lm.model.layers[i] = EngineDecoderLayer(layer, i, fuse=fuse)
        for module in lm.modules():  # float tensors to the compute dtype; M0E4 buffers keep theirs
            if isinstance(module, (M0E4Linear, M0E4Embedding)):
                if isinstance(module, M0E4Embedding):
                    module.out_dtype = dtype
                if isinstance(module, M0E4Linear) and module.bias is not None:
                    module.bias.data = module.bias.data.to(dtype)
                continue
            for p in module.parameters(recurse=False):
                if p.is_floating_point():
                    p.data = p.data.to(dtype)
        use_engine_linears(lm)  # float Linears (after the merges): decode matmuls by quintet's GEMV
        for p in lm.parameters():  # an inference engine: tools that run it with autograd on (evaluation
            p.requires_grad_(False)  # loops) then take the kernels, not the differentiable fallback
        if any(isinstance(m, M0E4Linear) for m in lm.modules()):
            matmul_dtype()  # measured here, at load, once per process
        self.lm = lm.eval()
        self.config: JambaConfig = lm.config
        self.compute_dtype = dtype
        self.max_cache_length = max_cache_length
        self.pad_multiple = pad_multiple
        self.quantization_config = quantization_config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: SubTensorKVCache | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutput:
        """The model's forward. Decode steps (one new token per row, batch <= `gemv_max_rows()`) run every
        quantized matmul through the 4-bit GEMV, other steps through dequantized tiles: chosen by the
        step's shape, never by data. Without a padding mask or labels the engine's own forward runs (no
        input checks that read the data)."""
        b, L = input_ids.shape
        path = "gemv" if L == 1 and b <= gemv_max_rows() else "tiles"
        with matmul_path(path), decode_activations(self.activations):
            if attention_mask is not None or labels is not None or kwargs:
                return self.lm(
                    input_ids,
                    attention_mask=attention_mask,
                    cache=cache,
                    labels=labels,
                    logits_to_keep=logits_to_keep,
                    **kwargs,
                )
            return CausalLMOutput(logits=self.step(input_ids, cache, logits_to_keep), cache=cache)

    def step(
        self, input_ids: torch.Tensor, cache: SubTensorKVCache | None, logits_to_keep: int = 0
    ) -> torch.Tensor:
        """Logits of `input_ids` (b, L) after the cache's past: embed, layers, final norm, head."""
        model = self.lm.model
        x = model.embed_tokens(input_ids)
        for layer in model.layers:
            x, _ = layer(x, None, None, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        norm = model.final_layernorm
        return self.lm.lm_head(rms_norm(x, norm.weight, norm.eps))

    def new_cache(self) -> SubTensorKVCache:
        return SubTensorKVCache(
            self.config,
            self.max_cache_length,
            self.pad_multiple,
            dtype=self.compute_dtype,
            device=self.device,
        )

    @property
    def device(self) -> torch.device:
        return self.lm.model.final_layernorm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype


def to_engine(
    model: JambaForCausalLM, dtype: torch.dtype = torch.float32, fuse: bool = True, **kw
) -> JambaEngine:
    """The engine around a float (or already quantized) Jamba model; the model's modules are reused."""
    return JambaEngine(model, dtype=dtype, fuse=fuse, **kw)


# ---------------------------------------------------------------------------------------------- loading
def load_quantized_model(directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of a quantized folder with its M0E4 modules (not yet wrapped in an engine); float
    tensors in `dtype`. Raises `QuantizedCheckpointError` naming the file, the tensor and the problem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such model folder")
    base, qc = read_config(directory)
    source = str(directory / "config.json")
    if qc is None:
        raise QuantizedCheckpointError(f"{source}: no quantization_config; not a quantized model folder")
    model = build_skeleton(base, source)
    swap_to_m0e4(model, qc, source)
    load_quantized_state(model, directory, qc, dtype)
    model.quantization_config = qc
    return model.eval()


def load_quantized(
    directory: str | os.PathLike,
    fuse: bool = True,
    dtype: torch.dtype = torch.float32,
    **engine_kwargs,
) -> nn.Module:
    """A quantized folder ready to run: a `JambaEngine` for Jamba, the quantized model for ViTAR / ViT.

    The weights stay in 4 bits; every quantized matmul runs from them in float32 (the M0E4 kernels, see
    `quintet.kernels.m0e4_cpu`). `dtype`: the activations between matmuls and the KV cache (float32 by
    default: exact to float32 rounding, and fastest on CPUs without native bfloat16). For a Jamba engine,
    `activations="int8"` quantizes the decode matmuls' inputs to int8 per block of 32 and multiplies by
    integer dot products (llama.cpp's trade for Q4_0: about 2x faster decode matmuls where the CPU has
    AVX-512 VNNI, the rounding error of 8-bit activations); prefill is unchanged.
    """
    model = load_quantized_model(directory, dtype)
    if isinstance(model, JambaForCausalLM):
        return JambaEngine(
            model, dtype=dtype, fuse=fuse, quantization_config=model.quantization_config, **engine_kwargs
        )
    return model


def load_dequantized(directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The quantized folder's model with plain float layers holding the dequantized weights (the reference
    the engine is compared against, and what a float tool can run)."""
    return dequantize_model(load_quantized_model(directory, dtype), dtype)


@torch.inference_mode()
def measure_generation(
    model: nn.Module, ids: torch.Tensor, new_tokens: int, vocab_limit: int | None = None
) -> dict[str, object]:
    """Greedy generation of `new_tokens` after the prompt `ids` (1, L), timed in two parts: the prefill
    (prompt into an empty cache) and the decode steps. Returns tokens/s of each and the tokens."""
    cache = model.new_cache()
    start = time.perf_counter()
    logits = model(ids, cache=cache, logits_to_keep=1).logits
    prefill_s = time.perf_counter() - start
    tokens = []
    start = time.perf_counter()
    for step in range(new_tokens):
        scores = logits[:, -1].float()
        nxt = (scores[:, :vocab_limit] if vocab_limit else scores).argmax(-1, keepdim=True)
        tokens.append(int(nxt))
        if step < new_tokens - 1:
            logits = model(nxt, cache=cache, logits_to_keep=1).logits
    decode_s = time.perf_counter() - start
    return {
        "prefill_tok_s": ids.shape[1] / prefill_s,
        "decode_tok_s": max(new_tokens - 1, 1) / decode_s,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "tokens": tokens,
    }
