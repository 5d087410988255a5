"""Alignment runs from one TOML file: `quintet align sft|dpo|sdpo CONFIG`.

    [model]
    path = "runs/demo/pretrained"        # model folder (its tokenizer.json is used when present)

    [data]
    train = "runs/demo/prefs.jsonl"      # SFT: prompt/completion or messages; DPO: prompt/chosen/rejected
    eval = "runs/demo/prefs-eval.jsonl"  # optional: held-out preference accuracy is reported on it

    [sft]  /  [dpo]                      # fields of SFTConfig / DPOConfig (lr, epochs, beta, loss_type, ...)
    chat_template = false                # true: string prompts go through the model folder's chat template
    max_length = 1024                    # TRL's default and truncation: truncation_mode = "keep_start"
    router_aux_loss_coef = 0.001         # MoE models: unset = the model config's; 0 turns it off

    [sdpo]
    steps = 2
    split = "easy_to_hard"               # or "step", "source", "score", "random"
    sources = ["add-easy", "add-hard"]   # for split = "source"

    [run]
    out_dir = "runs/align/sdpo"

Each run writes the aligned model folder to `out_dir/model` (with the tokenizer files copied), the
per-step metrics to `out_dir/metrics.jsonl` and a summary to `out_dir/summary.json`.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quintet.align.dpo import DPOConfig, preference_accuracy, train_dpo
from quintet.align.preference_data import read_preferences
from quintet.align.sdpo import SPLITS, split_steps, train_sdpo
from quintet.align.sft import SFTConfig, read_sft_examples, train_sft
from quintet.config import read_config
from quintet.io import atomic_write_text, copy_model_files, output_lock
from quintet.loading import load_trainable_model
from quintet.models.jamba import JambaForCausalLM
from quintet.tokenizer import load_tokenizer

SECTIONS = ("model", "data", "run", "sft", "dpo", "sdpo")


def _load(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    config = read_config(path, "alignment config")
    data = config.data
    config.check_sections(SECTIONS)
    for section, key, meaning in (
        ("model", "path", "the model folder to align"),
        ("data", "train", "the training JSONL"),
        ("run", "out_dir", "the folder to write the run to"),
    ):
        config.require(data.get(section, {}), key, f"[{section}]", meaning, section=section)
    data["_source"], data["_config"] = str(path), config
    return data


def _locked(run: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """`run` holding its config's `[run].out_dir` for itself (`quintet.io.output_lock`)."""

    @functools.wraps(run)
    def locked(config_path: str | os.PathLike, progress: bool = True) -> dict[str, Any]:
        with output_lock(_load(config_path, run.__name__)["run"]["out_dir"], "alignment run"):
            return run(config_path, progress)

    return locked


def _section(data: dict[str, Any], name: str, cls: type) -> Any:
    return data["_config"].section(name, cls)


def _save(model: JambaForCausalLM, source_dir: str, out_dir: Path) -> Path:
    target = out_dir / "model"
    model.save_pretrained(target)
    copy_model_files(source_dir, target)
    return target


def _write_metrics(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


@_locked
def run_sft(config_path: str | os.PathLike, progress: bool = True) -> dict[str, Any]:
    data = _load(config_path, "sft")
    cfg = _section(data, "sft", SFTConfig)
    model_dir, out = data["model"]["path"], Path(data["run"]["out_dir"])
    model = load_trainable_model(model_dir)
    tokenizer = load_tokenizer(model_dir, vocab_size=model.config.vocab_size)
    history = train_sft(model, tokenizer, read_sft_examples(data["data"]["train"]), cfg, progress)
    _write_metrics(out, history)
    summary = {
        "model": str(_save(model, model_dir, out)),
        "steps": len(history),
        "final_loss": history[-1]["loss"],
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _eval_accuracy(
    model: JambaForCausalLM, tokenizer: Any, data: dict[str, Any], cfg: DPOConfig
) -> float | None:
    path = data["data"].get("eval")
    return preference_accuracy(model, tokenizer, read_preferences(path), cfg) if path else None


@_locked
def run_dpo(config_path: str | os.PathLike, progress: bool = True) -> dict[str, Any]:
    data = _load(config_path, "dpo")
    cfg = _section(data, "dpo", DPOConfig)
    model_dir, out = data["model"]["path"], Path(data["run"]["out_dir"])
    if cfg.cache_dir is None:
        cfg.cache_dir = str(out / "reference-cache")
    model = load_trainable_model(model_dir)
    reference = load_trainable_model(model_dir)
    tokenizer = load_tokenizer(model_dir, vocab_size=model.config.vocab_size)
    pairs = read_preferences(data["data"]["train"])
    before = _eval_accuracy(model, tokenizer, data, cfg)
    history = train_dpo(model, tokenizer, pairs, cfg, ref_model=reference, progress=progress)
    _write_metrics(out, history)
    summary = {
        "model": str(_save(model, model_dir, out)),
        "steps": len(history),
        "eval_accuracy_before": before,
        "eval_accuracy_after": _eval_accuracy(model, tokenizer, data, cfg),
        "final": history[-1],
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


@_locked
def run_sdpo(config_path: str | os.PathLike, progress: bool = True) -> dict[str, Any]:
    data = _load(config_path, "sdpo")
    cfg = _section(data, "dpo", DPOConfig)
    spec = dict(data.get("sdpo", {}))
    config = data["_config"]
    config.check_keys(spec, ("steps", "split", "sources", "seed"), "[sdpo]", section="sdpo")
    split = spec.get("split", "easy_to_hard")
    if split not in SPLITS:
        raise config.error(
            f"[sdpo].split = {split!r}: valid: {', '.join(SPLITS)}", section="sdpo", key="split"
        )
    model_dir, out = data["model"]["path"], Path(data["run"]["out_dir"])
    if cfg.cache_dir is None:
        cfg.cache_dir = str(out / "reference-cache")
    model = load_trainable_model(model_dir)
    tokenizer = load_tokenizer(model_dir, vocab_size=model.config.vocab_size)
    pairs = read_preferences(data["data"]["train"])
    steps = split_steps(
        pairs,
        spec.get("steps", 2),
        split,
        sources=spec.get("sources"),
        sft_model=model,
        tokenizer=tokenizer,
        settings=cfg,
        seed=spec.get("seed", cfg.seed),
    )
    before = _eval_accuracy(model, tokenizer, data, cfg)
    model, results = train_sdpo(model, tokenizer, steps, cfg, progress=progress)
    _write_metrics(out, [{"sdpo_step": r.step, **m} for r in results for m in r.metrics])
    summary = {
        "model": str(_save(model, model_dir, out)),
        "split": split,
        "steps": [
            {"step": r.step, "pairs": r.pairs, "reference_margin": r.reference_margin, "final": r.metrics[-1]}
            for r in results
        ],
        "eval_accuracy_before": before,
        "eval_accuracy_after": _eval_accuracy(model, tokenizer, data, cfg),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
