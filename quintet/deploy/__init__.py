"""Deployment: M0E4 FP4 weights, a sub-tensor KV cache, symbolic shapes and a memory plan (Transformer-Lite).

    from quintet.deploy import quantize_folder, load_quantized
    quantize_folder("runs/model", "runs/model-fp4", group_size=64)      # or gptq="calib.jsonl"
    engine = load_quantized("runs/model-fp4")                           # JambaEngine (or a quantized ViTAR)

See docs/deploy.md. `shapes` and `memory_plan` (symbolic shapes, `quintet deploy plan`) are imported on use.
"""

from quintet.deploy.convert import quantize_folder
from quintet.deploy.engine import JambaEngine, measure_generation, to_engine
from quintet.deploy.kv_cache import SubTensorKVCache
from quintet.deploy.qlinear import M0E4Embedding, M0E4Linear
from quintet.deploy.quantize import QuantConfig, dequantize_model, quantize
from quintet.deploy.quantized_folder import (
    QuantizedCheckpointError,
    load_dequantized,
    load_quantized,
    load_quantized_model,
    save_quantized,
)
from quintet.kernels.m0e4 import M0E4Tensor, QuantizationError, dequantize, quantize_rtn

__all__ = [
    "JambaEngine",
    "M0E4Embedding",
    "M0E4Linear",
    "M0E4Tensor",
    "QuantConfig",
    "QuantizationError",
    "QuantizedCheckpointError",
    "SubTensorKVCache",
    "dequantize",
    "dequantize_model",
    "load_dequantized",
    "load_quantized",
    "load_quantized_model",
    "measure_generation",
    "quantize",
    "quantize_folder",
    "quantize_rtn",
    "save_quantized",
    "to_engine",
]
