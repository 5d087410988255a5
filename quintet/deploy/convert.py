"""A float model folder to an FP4 (M0E4) folder: `quintet deploy quantize`.

quantize_folder("runs/model", "runs/model-fp4", group_size=64)          # round to nearest
quantize_folder("runs/model", "runs/model-fp4", gptq="calib.jsonl")     # GPTQ on calibration text
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from quintet.deploy.gptq import gptq_quantize_jamba, read_calibration
from quintet.deploy.quantize import DEFAULT_SKIP, QuantConfig, quantize
from quintet.deploy.quantized_folder import file_bytes, read_folder_config, save_quantized
from quintet.models import from_pretrained


def load_float_model(directory: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """A float model folder's model (float32) and its config.json dict."""
    base, qc = read_folder_config(directory)
    if qc is not None:
        raise ValueError(
            f"{directory}: already quantized ({qc['quant_method']}); give the float model folder"
        )
    return from_pretrained(directory, base.get("model_type")), base


def quantize_folder(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    group_size: int = 64,
    gptq: str | os.PathLike | None = None,
    gptq_samples: int = 32,
    gptq_seq_len: int = 256,
    skip: tuple[str, ...] = DEFAULT_SKIP,
) -> dict[str, Any]:
    """Quantize a float model folder into `out_dir`; round to nearest, or GPTQ on the JSONL file `gptq`.

    Returns a summary: modules quantized, bytes of the weight files before and after, calibration tokens.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError(f"--out {out_dir}: the same folder as the model; give a new folder")
    model, base = load_float_model(model_dir)
    config = QuantConfig(group_size=group_size, calibration="gptq" if gptq else "rtn", skip=skip)
    quantized = None
    calibration_tokens = 0
    if gptq is not None:
        if base.get("model_type") != "jamba":
            raise ValueError(
                f"--gptq: GPTQ calibration is implemented for Jamba text models, not {base['model_type']}"
            )
        from quintet.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model_dir, vocab_size=model.config.vocab_size)
        samples = read_calibration(gptq, tokenizer.encode, gptq_seq_len, gptq_samples)
        calibration_tokens = sum(s.numel() for s in samples)
        quantized = gptq_quantize_jamba(model, samples, config)
    qc = quantize(model, config, quantized)
    if gptq is not None:
        qc["calibration_file"] = str(gptq)
        qc["calibration_tokens"] = calibration_tokens
    save_quantized(model, out_dir, base, qc, model_dir)
    return {
        "model": str(model_dir),
        "out": str(out_dir),
        "group_size": group_size,
        "calibration": config.calibration,
        "calibration_tokens": calibration_tokens,
        "modules_quantized": len(qc["modules"]),
        "bytes_before": file_bytes(model_dir),
        "bytes_after": file_bytes(out_dir),
    }
