"""Multiple-choice tasks scored by log-likelihood, as lm-evaluation-harness does.

A task is a JSONL file, one item per line:

    {"id": "q1", "question": "The capital of Finland is", "choices": ["Helsinki", "Turku"], "answer": 0,
     "lang": "en"}

(`context` may replace `question`; `id` and `lang` are optional.) Each choice is scored as the summed
log-probability of `delimiter + choice` after the question (delimiter " ", lm-eval's `target_delimiter`).
Metrics: `acc` (the highest log-likelihood is the answer) and `acc_norm` (log-likelihood divided by the
choice's length in characters, without the delimiter: lm-eval's normalisation), overall and per language.

Context/continuation tokens follow lm-eval's rule (`encode_pair`): trailing spaces of the context move to
the continuation, the continuation's tokens are those of `encode(context + continuation)` after the first
`len(encode(context))`, and an empty context is replaced by the prefix token. The lm-eval adapter
(`lm_eval_adapter.py`) calls `loglikelihoods` here, so both score identically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quintet.eval.perplexity import EvalDataError, prefix_token_id, score_windows
from quintet.io import check_row, iter_jsonl
from quintet.loading import load_model_and_tokenizer
from quintet.tokenizer import TextTokenizer


@dataclass(frozen=True)
class MCItem:
    id: str
    context: str
    choices: tuple[str, ...]
    answer: int
    lang: str | None = None


def read_mc_task(path: str | os.PathLike) -> list[MCItem]:
    """Items of a JSONL task; the first bad line raises an error naming file, line, field and value."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such multiple-choice task file")
    items = []
    for where, number, row in iter_jsonl(path, EvalDataError):
        row = check_row(row, where, EvalDataError)
        context = row.get("question", row.get("context"))
        if not isinstance(context, str):
            raise EvalDataError(f"{where}: needs a string 'question' (or 'context'); got {context!r}")
        choices = row.get("choices")
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise EvalDataError(
                f"{where}: field 'choices' = {choices!r}: must be a list of >= 2 non-empty strings"
            )
        answer = row.get("answer")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise EvalDataError(
                f"{where}: field 'answer' = {answer!r}: must be an index in [0, {len(choices)})"
            )
        items.append(MCItem(str(row.get("id", number)), context, tuple(choices), answer, row.get("lang")))
    if not items:
        raise EvalDataError(f"{path}: no items in the task file")
    return items


def encode_pair(
    tokenizer: TextTokenizer, context: str, continuation: str, prefix_id: int
) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) by lm-eval's rule (see the module docstring)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        return [prefix_id], tokenizer.encode(continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, tokenizer.encode(context + continuation)[len(context_ids) :]


@torch.inference_mode()
def loglikelihoods(
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    requests: Sequence[tuple[str, str]],
    max_length: int = 1024,
    batch_size: int = 8,
) -> list[tuple[float, bool]]:
    """(log p(continuation | context), is greedy) per (context, continuation) pair.

    `max_length` is the model's input length, as in lm-eval's `hf` backend (`_loglikelihood_tokens`):
    context + continuation is cut to its last max_length + 1 tokens and all but the last are fed, so the
    continuation's last token is conditioned on max_length tokens. A continuation longer than
    `max_length` is an error (lm-eval asserts it).
    """
    was_training = model.training
    model.eval()
    prefix = prefix_token_id(model)
    windows = []
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation, prefix)
        if not cont:
            raise EvalDataError(f"continuation {continuation!r} after {context[-40:]!r} encodes to no tokens")
        if len(cont) > max_length:
            raise EvalDataError(
                f"continuation {continuation[:40]!r}: {len(cont)} tokens, more than max_length = "
                f"{max_length} (the model's input length); raise max_length"
            )
        windows.append(((ctx + cont)[-(max_length + 1) :], len(cont)))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    try:
        return score_windows(model, windows, batch_size, pad)
    finally:
        model.train(was_training)


def evaluate_mc(
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    items: Sequence[MCItem],
    delimiter: str = " ",
    max_length: int = 1024,
    batch_size: int = 8,
) -> dict[str, Any]:
    """acc and acc_norm overall and per language, plus each item's log-likelihoods."""
    requests = [(it.context, delimiter + choice) for it in items for choice in it.choices]
    scores = iter(loglikelihoods(model, tokenizer, requests, max_length, batch_size))
    records = []
    for it in items:
        lls = [next(scores)[0] for _ in it.choices]
        norm = [ll / len(c) for ll, c in zip(lls, it.choices, strict=True)]
        records.append(
            {
                "id": it.id,
                "lang": it.lang,
                "loglikelihoods": lls,
                "acc": float(max(range(len(lls)), key=lls.__getitem__) == it.answer),
                "acc_norm": float(max(range(len(norm)), key=norm.__getitem__) == it.answer),
            }
        )

    def mean(rows: list[dict[str, Any]], key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    by_lang = {}
    for lang in sorted({r["lang"] for r in records if r["lang"]}):
        rows = [r for r in records if r["lang"] == lang]
        by_lang[lang] = {"n": len(rows), "acc": mean(rows, "acc"), "acc_norm": mean(rows, "acc_norm")}
    return {
        "n": len(records),
        "acc": mean(records, "acc"),
        "acc_norm": mean(records, "acc_norm"),
        "by_language": by_lang,
        "items": records,
    }


def evaluate_mc_task(
    model_dir: str | os.PathLike,
    task: str | os.PathLike,
    batch_size: int = 8,
    max_length: int = 1024,
    out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Score a model folder on a JSONL multiple-choice task; optional JSON output (with per-item scores)."""
    from quintet.io import atomic_write_text

    model, tokenizer = load_model_and_tokenizer(model_dir)
    result = {"model": str(model_dir), "task": str(task)}
    result.update(
        evaluate_mc(model, tokenizer, read_mc_task(task), max_length=max_length, batch_size=batch_size)
    )
    if out is not None:
        atomic_write_text(out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


LM_EVAL_TASK = """\
# lm-evaluation-harness task over a quintet multiple-choice JSONL file (local; nothing is downloaded).
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_lm_eval_task(task: str | os.PathLike, out_dir: str | os.PathLike, name: str | None = None) -> Path:
    """An lm-eval YAML task (for `--include_path out_dir`) over the same JSONL file; returns the YAML path.

    The file must use `question` (not `context`), as the YAML reads that field.
    """
    from quintet.io import atomic_write_text

    task = Path(task).resolve()
    read_mc_task(task)  # validates every line
    lines = [line for line in task.read_text(encoding="utf-8").splitlines() if line.strip()]
    for number, line in enumerate(lines, start=1):
        if "question" not in json.loads(line):
            raise EvalDataError(f"{task}: item {number} has no 'question'; the lm-eval task reads that field")
    name = name or f"quintet_{task.stem}".replace("-", "_")
    path = Path(out_dir) / f"{name}.yaml"
    atomic_write_text(path, LM_EVAL_TASK.format(name=name, data=json.dumps(str(task))))
    return path
