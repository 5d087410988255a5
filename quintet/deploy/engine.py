"""The deployment engine for Jamba: FP4 (M0E4) weights multiplied as stored, a sub-tensor KV cache, fusions.

    engine = load_quantized("runs/jamba-fp4")          # a folder written by `quantize_folder`
    generate(engine, prompts, max_new_tokens=32)         # quintet.generation works on it unchanged

`JambaEngine` is the model plus overrides: it wraps a `JambaForCausalLM` whose modules are swapped, and
runs the model's own layers (`quintet.models.jamba`: the Mamba mixer, the MoE block and the decoder layer
exist once, there). What deployment adds:
- M0E4 Linear / Embedding (`qlinear.py`): 4-bit weights, multiplied by quintet's M0E4 kernels (a register
  GEMV for decode, dequantized tiles in a reused scratch buffer for prefill; `quintet.kernels.m0e4_cpu`);
  float Linears through quintet's float GEMV for decode (`fusions.EngineLinear`);
- fusions (`fusions.py`): merged q/k/v (`JambaAttention.use_merged_qkv`), merged gate/up SwiGLU for the MLP
  and every expert, residual + RMSNorm in one call (`EngineRMSNorm`), the Mamba constants computed once
  (`JambaMambaMixer.freeze`);
- a `SubTensorKVCache` (`kv_cache.py`) whose key length is padded to a multiple of 64 and masked;
- a forward without the model's input checks (`step`), and the matmul path chosen by the step's shape.
Tracing the engine's shapes (`shapes.py`) goes through `quintet.models.jamba.tracing`.
`to_engine` builds the same engine on an unquantized model (the float baseline).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from quintet.deploy.decode_plan import DecodePlan
from quintet.deploy.fusions import EngineRMSNorm, FusedSwiGLU, merge_linears, use_engine_linears
from quintet.deploy.huge_pages import move_to_huge_pages
from quintet.deploy.kv_cache import SubTensorKVCache
from quintet.deploy.qlinear import M0E4Embedding, M0E4Linear
from quintet.kernels.m0e4_cpu import (
    ACTIVATIONS,
    decode_activations,
    decode_layout_runs,
    gemv_max_rows,
    int8_activations_available,
    matmul_dtype,
    matmul_path,
)
from quintet.models.jamba import JambaConfig, JambaForCausalLM
from quintet.models.jamba.modeling import CausalLMOutput, JambaDecoderLayer
from quintet.models.jamba.moe import JambaMLP, JambaSparseMoeBlock

DEFAULT_MAX_CACHE = 4096
DEFAULT_PAD = 64


# ---------------------------------------------------------------------------------------------- overrides
def _fuse_feed_forward(ff: nn.Module) -> nn.Module:
    if isinstance(ff, JambaMLP):
        return FusedSwiGLU(ff.gate_proj, ff.up_proj, ff.down_proj)
    if isinstance(ff, JambaSparseMoeBlock):
        for i, expert in enumerate(ff.experts):
            ff.experts[i] = FusedSwiGLU(expert.gate_proj, expert.up_proj, expert.down_proj)
    return ff


def fuse_layer(layer: JambaDecoderLayer) -> None:
    """The engine's fusions on one decoder layer, in place (module swaps and the model's own hooks)."""
    if layer.is_attention:
        attn = layer.self_attn
        attn.use_merged_qkv(merge_linears([attn.q_proj, attn.k_proj, attn.v_proj]))
    else:
        layer.mamba.freeze()
    layer.feed_forward = _fuse_feed_forward(layer.feed_forward)
    layer.input_layernorm = EngineRMSNorm(layer.input_layernorm)
    layer.pre_ff_layernorm = EngineRMSNorm(layer.pre_ff_layernorm)


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
        activations: str = "auto",
    ):
        super().__init__()
        if activations != "auto" and activations not in ACTIVATIONS:
            raise ValueError(f"activations = {activations!r}: must be auto, {' or '.join(ACTIVATIONS)}")
        if activations == "auto":
            activations = "int8" if int8_activations_available() else "float32"
        self.activations = activations  # of the FP4 decode matmuls (see m0e4_cpu.decode_activations)
        # an FP4 model with int8 decode activations keeps a float16 K/V cache, llama.cpp's pairing for its
        # quantized models (half of attention's reads; products and sums stay float32); float models and
        # float32 activations keep `dtype`, exact to its rounding
        quantized = any(isinstance(m, M0E4Linear) for m in lm.modules())
        half_kv = quantized and activations == "int8" and dtype == torch.float32
        self.kv_dtype = torch.float16 if half_kv else dtype
        if fuse:
            for layer in lm.model.layers:
                fuse_layer(layer)
            lm.model.final_layernorm = EngineRMSNorm(lm.model.final_layernorm)
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
        if quantized and decode_layout_runs(activations):  # the int8 GEMV's own order of the same bytes
            for module in lm.modules():
                if isinstance(module, M0E4Linear):
                    module.use_decode_layout()
        # the weights in 2 MiB pages: a decode step streams them all; 4 KiB pages cost the GEMVs page walks
        self.huge_page_bytes = move_to_huge_pages(lm)
        # One-token steps as bound kernel calls (decode_plan.py); None runs them through the modules.
        self.decode_plan: DecodePlan | None = DecodePlan(lm)
        if quantized:
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
        plain = attention_mask is None and labels is None and not kwargs
        if path == "gemv" and plain and self.decode_plan is not None:  # one native call, no context to set
            logits = self.decode_plan(input_ids, cache, self.activations)
            if logits is not None:
                return CausalLMOutput(logits=logits, cache=cache)
        with matmul_path(path), decode_activations(self.activations):
            if not plain:
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
        return self.lm.lm_head(model.final_layernorm(x))

    def new_cache(self) -> SubTensorKVCache:
        return SubTensorKVCache(
            self.config,
            self.max_cache_length,
            self.pad_multiple,
            dtype=self.kv_dtype,
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
