"""Red-team evaluation: generate an answer to every prompt, judge it, count outcomes by category and language.

Two numbers per cell (category x language):
  harmful-compliance rate  compliance / judged, on harmful prompts (lower is safer)
  over-refusal rate        refusal / judged, on benign prompts only (lower is more helpful)
where judged = n - error. Empty generations are their own outcome (in the denominator: an empty answer is
neither a refusal nor compliance); a prompt whose generation fails is recorded as `error` with its message
and the run goes on.

Prompts are rendered as a one-turn chat (`quintet.chat.render_prompt`) and decoded greedily.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from quintet.chat import render_prompt
from quintet.generation import generate
from quintet.io import atomic_path
from quintet.loading import load_model_and_tokenizer
from quintet.models.jamba import JambaForCausalLM
from quintet.safety.judges import ProjectJudge, load_judge
from quintet.safety.redteam_sets import (
    LANGUAGES,
    RedteamPrompt,
    build_redteam_prompts,
    categories,
    read_redteam_prompts,
    select_slice,
)
from quintet.safety.verdict import OUTCOMES, Judge
from quintet.tokenizer import TextTokenizer

RECORD_OUTCOMES = (*OUTCOMES, "error")
RATE_OF = {"harmful": ("compliance", "harmful_compliance_rate"), "benign": ("refusal", "over_refusal_rate")}


@dataclass
class RedteamConfig:
    max_new_tokens: int = 64
    batch_size: int = 16
    per_cell: int | None = None  # at most this many prompts per (kind, category, language); None = all
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"RedteamConfig.{name} = {value!r}: must be a positive integer")
        if self.per_cell is not None and (not isinstance(self.per_cell, int) or self.per_cell < 1):
            raise ValueError(
                f"RedteamConfig.per_cell = {self.per_cell!r}: must be a positive integer or None"
            )


@dataclass
class RedteamRecord:
    id: str
    category: str
    lang: str
    kind: str
    prompt: str
    response: str
    outcome: str
    score: float | None = None
    by: str = ""
    error: str | None = None


def generate_responses(
    model: JambaForCausalLM,
    tokenizer: TextTokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = False,
) -> list[str | Exception]:
    """Greedy answers to chat-rendered prompts, batched by length; a failing prompt yields its exception."""
    encoded = [render_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    vocab_limit = min(tokenizer.vocab_size, model.config.vocab_size)
    out: list[str | Exception] = [""] * len(encoded)

    def run(idx: list[int]) -> list[list[int]]:
        return generate(
            model, [encoded[i] for i in idx], max_new_tokens=max_new_tokens, vocab_limit=vocab_limit
        )

    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress, file=sys.stderr):
        try:
            results: list[list[int] | Exception] = list(run(batch))
        except (ValueError, RuntimeError):
            results = []  # find the prompt(s) that fail; the others still get answers
            for i in batch:
                try:
                    results.append(run([i])[0])
                except (ValueError, RuntimeError) as err:
                    results.append(err)
        for i, r in zip(batch, results, strict=True):
            out[i] = r if isinstance(r, Exception) else tokenizer.decode(r)
    return out


def judge_records(
    prompts: Sequence[RedteamPrompt], responses: Sequence[str | Exception], judge: Judge
) -> list[RedteamRecord]:
    """Judge each response; benign ones go to the project's judge when `judge` cannot judge benign answers."""
    records = [
        RedteamRecord(
            p.id, p.category, p.lang, p.kind, p.prompt, "" if isinstance(r, Exception) else r, "error"
        )
        for p, r in zip(prompts, responses, strict=True)
    ]
    for r, resp in zip(records, responses, strict=True):
        if isinstance(resp, Exception):
            r.error = f"{type(resp).__name__}: {resp}"
    fallback = judge if judge.judges_benign else ProjectJudge()
    for kind, j in (("harmful", judge), ("benign", fallback)):
        idx = [i for i, r in enumerate(records) if r.kind == kind and r.error is None]
        if not idx:
            continue
        for i, v in zip(
            idx, j.judge([records[i].prompt for i in idx], [records[i].response for i in idx]), strict=True
        ):
            records[i].outcome, records[i].score, records[i].by = v.outcome, v.score, v.by or j.name
    return records


def _cell(records: Sequence[RedteamRecord], kind: str) -> dict[str, Any]:
    counts = {o: sum(1 for r in records if r.outcome == o) for o in RECORD_OUTCOMES}
    judged = len(records) - counts["error"]
    numerator, _ = RATE_OF[kind]
    return {"n": len(records), **counts, "rate": counts[numerator] / judged if judged else None}


def summarize(records: Sequence[RedteamRecord]) -> dict[str, Any]:
    """Counts and rates per kind: overall, by category, by language, and by (category, language).

    The over-refusal rate is computed on benign prompts only; the harmful-compliance rate on harmful only.
    """
    out: dict[str, Any] = {}
    for kind, (_, metric) in RATE_OF.items():
        mine = [r for r in records if r.kind == kind]
        cats = [c for c in categories() if any(r.category == c for r in mine)]
        cats += sorted({r.category for r in mine} - set(cats))
        langs = [lang for lang in LANGUAGES if any(r.lang == lang for r in mine)]
        langs += sorted({r.lang for r in mine} - set(langs))
        out[kind] = {
            "metric": metric,
            "overall": _cell(mine, kind),
            "by_category": {c: _cell([r for r in mine if r.category == c], kind) for c in cats},
            "by_language": {g: _cell([r for r in mine if r.lang == g], kind) for g in langs},
            "by_cell": {
                c: {g: _cell([r for r in mine if r.category == c and r.lang == g], kind) for g in langs}
                for c in cats
            },
        }
    return out


def _paired(pairs: list[tuple[RedteamRecord, RedteamRecord]], kind: str) -> dict[str, Any]:
    """Rate of B minus rate of A on the same prompts (judged in both), with a 95% interval of the paired
    difference: mean of d_i = hit_B - hit_A, +- 1.96 sd / sqrt(n) (normal approximation)."""
    numerator, _ = RATE_OF[kind]
    judged = [(a, b) for a, b in pairs if a.outcome != "error" and b.outcome != "error"]
    n = len(judged)
    if not n:
        return {"n": 0, "a": None, "b": None, "difference": None, "ci95": None}
    d = [(b.outcome == numerator) - (a.outcome == numerator) for a, b in judged]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    half = 1.96 * math.sqrt(var / n)
    rate_a = sum(a.outcome == numerator for a, _ in judged) / n
    rate_b = sum(b.outcome == numerator for _, b in judged) / n
    return {"n": n, "a": rate_a, "b": rate_b, "difference": mean, "ci95": [mean - half, mean + half]}


def compare_records(records_a: Sequence[RedteamRecord], records_b: Sequence[RedteamRecord]) -> dict[str, Any]:
    """Model B against model A on the same prompts: per kind (harmful compliance, over-refusal), overall,
    by category and by language, the difference of the rates with its 95% interval; and every prompt
    whose verdict changed."""
    by_id = {r.id: r for r in records_a}
    pairs = [(by_id[r.id], r) for r in records_b if r.id in by_id]
    out: dict[str, Any] = {}
    for kind in RATE_OF:
        mine = [(a, b) for a, b in pairs if a.kind == kind]
        out[kind] = {
            "overall": _paired(mine, kind),
            "by_category": {c: _paired([p for p in mine if p[0].category == c], kind)
                            for c in sorted({a.category for a, _ in mine})},
            "by_language": {g: _paired([p for p in mine if p[0].lang == g], kind)
                            for g in sorted({a.lang for a, _ in mine})},
        }  # fmt: skip
    out["changed"] = [
        {
            "id": a.id,
            "kind": a.kind,
            "category": a.category,
            "lang": a.lang,
            "prompt": a.prompt,
            "verdict_a": a.outcome,
            "verdict_b": b.outcome,
            "response_a": a.response,
            "response_b": b.response,
        }
        for a, b in pairs
        if a.outcome != b.outcome
    ]
    return out


def write_records(path: str | os.PathLike, records: Sequence[RedteamRecord]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
    return path


def redteam_model(
    model_dir: str | os.PathLike, prompts: Sequence[RedteamPrompt], judge: Judge, config: RedteamConfig
) -> tuple[list[RedteamRecord], dict[str, Any]]:
    """Generate, judge and summarize one model folder; returns (records, summary with timing)."""
    model, tokenizer = load_model_and_tokenizer(model_dir)
    start = time.perf_counter()
    with torch.inference_mode():
        responses = generate_responses(
            model,
            tokenizer,
            [p.prompt for p in prompts],
            config.max_new_tokens,
            config.batch_size,
            config.progress,
        )
    gen_seconds = time.perf_counter() - start
    records = judge_records(prompts, responses, judge)
    summary = summarize(records)
    summary["seconds"] = {"generate": gen_seconds, "judge": time.perf_counter() - start - gen_seconds}
    return records, summary


def _model_names(model_dirs: Sequence[str | os.PathLike]) -> list[str]:
    names = [Path(d).resolve().name or str(d) for d in model_dirs]
    if len(set(names)) < len(names):
        names = [f"{n} ({i + 1})" for i, n in enumerate(names)]
    return names


def evaluate_redteam(
    model_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    prompts_path: str | os.PathLike | None = None,
    judge: str | Judge = "quintet",
    config: RedteamConfig | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Red-team one or more model folders side by side; writes report.json, report.md, redteam.png and one
    generations-<name>.jsonl per model under `out_dir`; returns the report. With two folders the report
    also holds `comparison` (`compare_records`: differences with 95% intervals, the changed verdicts).

    Prompts: a red-team JSONL file, or by default the project's eval split (seed 0).
    """
    from quintet.safety.report import write_report

    config = config or RedteamConfig()
    judge = load_judge(judge) if isinstance(judge, str) else judge
    if prompts_path is not None:
        prompts, source = read_redteam_prompts(prompts_path), str(prompts_path)
    else:
        prompts, source = build_redteam_prompts(seed=0)[1], "quintet eval split (seed 0)"
    if config.per_cell is not None:
        prompts = select_slice(prompts, config.per_cell, config.seed)
    names = list(names) if names is not None else _model_names(model_dirs)
    if len(names) != len(model_dirs):
        raise ValueError(f"{len(names)} names for {len(model_dirs)} model folders")
    out = Path(out_dir)
    report: dict[str, Any] = {
        "judge": judge.name,
        "judges_benign": judge.judges_benign,
        "prompts": {"source": source, "n": len(prompts), "per_cell": config.per_cell},
        "config": {k: v for k, v in asdict(config).items() if k != "progress"},
        "categories": list(categories()),
        "models": [],
    }
    all_records = []
    for name, model_dir in zip(names, model_dirs, strict=True):
        records, summary = redteam_model(model_dir, prompts, judge, config)
        all_records.append(records)
        gen_path = write_records(out / f"generations-{name.replace(' ', '_')}.jsonl", records)
        report["models"].append(
            {"name": name, "model_dir": str(model_dir), "generations": gen_path.name, **summary}
        )
    if len(all_records) == 2:  # --compare: the second model against the first, prompt by prompt
        report["comparison"] = {"a": names[0], "b": names[1], **compare_records(*all_records)}
    report["files"] = {k: str(v) for k, v in write_report(report, out).items()}
    return report
