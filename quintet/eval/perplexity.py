"""Perplexity and bits-per-byte per language on held-out text.

A document is scored as the model's own tokens of its text after a prefix token (the model's bos id):
every token is predicted once, in rolling windows of at most `max_length` input tokens, exactly as
lm-evaluation-harness's `loglikelihood_rolling` cuts them (`get_rolling_token_windows` with
`context_len=1`, then `make_disjoint_window`, fed through `_loglikelihood_tokens`). `max_length` is the
model's input length, lm-eval's meaning: a window holds max_length + 1 tokens, its last one only a target.
Per language:

    perplexity    = exp(total NLL / scored tokens)                 (depends on the tokenizer)
    bits per byte = total NLL in nats / ln 2 / UTF-8 bytes of the text   (comparable across tokenizers)

Texts come from held-out token shards (`quintet.data.shards`: each source's `heldout` split, decoded with
the shards' tokenizer) or from JSONL files of `{"text", "lang"}` rows; both become {lang: [text, ...]}.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from quintet.io import iter_jsonl
from quintet.loading import load_model_and_tokenizer
from quintet.tokenizer import TextTokenizer


class EvalDataError(ValueError):
    """An evaluation data file has a row that cannot be scored."""


def rolling_windows(ids: Sequence[int], prefix_id: int, max_length: int) -> list[tuple[list[int], int]]:
    """(window tokens, n): feed all but the window's last token, score its last n tokens. Together every
    token of `ids` is scored exactly once. lm-eval's windows: the first is `prefix_id` and up to
    `max_length` tokens, all scored; each later one scores the next up to `max_length` tokens, each
    conditioned on the `max_length` tokens before it (so the first of them on fewer)."""
    if max_length < 1:
        raise ValueError(f"max_length = {max_length!r}: must be at least 1")
    seq = [prefix_id, *ids]
    windows, start = [], 1
    while start < len(seq):
        end = min(start + max_length, len(seq))
        windows.append((seq[max(0, end - max_length - 1) : end], end - start))
        start = end
    return windows


@torch.inference_mode()
def score_windows(
    model: torch.nn.Module, windows: Sequence[tuple[list[int], int]], batch_size: int = 4, pad_id: int = 0
) -> list[tuple[float, bool]]:
    """Per window (tokens, n): feed `tokens[:-1]` and return (sum of log p of the last n tokens, whether
    each of them is the argmax), lm-eval's `_loglikelihood_tokens` scoring."""
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    out: list[tuple[float, bool]] = [(0.0, True)] * len(windows)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        width = max(len(windows[i][0]) for i in idx) - 1  # the input length
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(windows[i][0]) - 1] = torch.tensor(windows[i][0][:-1])
        # Only the last `keep` positions' logits are needed (right padding leaves real positions exact).
        keep = max(width - (len(windows[i][0]) - 1 - windows[i][1]) for i in idx)
        logits = model(ids.to(model.device), logits_to_keep=keep).logits.cpu()
        for row, i in enumerate(idx):
            seq, n = windows[i]
            if n == 0:
                continue
            pos = torch.arange(len(seq) - 1 - n, len(seq) - 1) - (width - keep)
            targets = torch.tensor(seq[len(seq) - n :])
            step = torch.log_softmax(logits[row, pos].float(), dim=-1)
            total = float(step.gather(-1, targets[:, None]).double().sum())
            out[i] = (total, bool((step.argmax(-1) == targets).all()))
    return out


def prefix_token_id(model: torch.nn.Module) -> int:
    cfg = model.config
    return cfg.bos_token_id if cfg.bos_token_id is not None else cfg.eos_token_ids[0]


def text_nll(
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    texts: Sequence[str],
    max_length: int = 1024,
    batch_size: int = 4,
) -> list[tuple[float, int]]:
    """Per text: (total NLL in nats of its tokens, number of tokens); an empty text gives (0.0, 0)."""
    prefix = prefix_token_id(model)
    windows, owner = [], []
    counts = []
    for t, text in enumerate(texts):
        ids = tokenizer.encode(text)
        counts.append(len(ids))
        for w in rolling_windows(ids, prefix, max_length):
            windows.append(w)
            owner.append(t)
    totals = [0.0] * len(texts)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    for t, (logp, _) in zip(owner, score_windows(model, windows, batch_size, pad), strict=True):
        totals[t] -= logp
    return list(zip(totals, counts, strict=True))


def perplexity_by_language(
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    texts_by_lang: Mapping[str, Sequence[str]],
    max_length: int = 1024,
    batch_size: int = 4,
) -> dict[str, dict[str, float | int]]:
    """{lang: documents, tokens, bytes, nll, perplexity, bits_per_byte} plus an "all" row (micro-averaged)."""
    was_training = model.training
    model.eval()
    out: dict[str, dict[str, float | int]] = {}
    try:
        for lang, texts in texts_by_lang.items():
            kept = [t for t in texts if t]
            scores = text_nll(model, tokenizer, kept, max_length, batch_size)
            nll = sum(s[0] for s in scores)
            tokens = sum(s[1] for s in scores)
            n_bytes = sum(len(t.encode("utf-8")) for t in kept)
            out[lang] = _row(len(kept), tokens, n_bytes, nll, skipped=len(texts) - len(kept))
    finally:
        model.train(was_training)
    if len(out) > 1:
        total = {
            k: sum(r[k] for r in out.values())
            for k in ("documents", "tokens", "bytes", "nll", "skipped_empty")
        }
        out["all"] = _row(
            total["documents"], total["tokens"], total["bytes"], total["nll"], total["skipped_empty"]
        )
    return out


def _row(documents: int, tokens: int, n_bytes: int, nll: float, skipped: int) -> dict[str, float | int]:
    return {
        "documents": documents,
        "tokens": tokens,
        "bytes": n_bytes,
        "nll": nll,
        "perplexity": math.exp(nll / tokens) if tokens else float("nan"),
        "bits_per_byte": nll / math.log(2) / n_bytes if n_bytes else float("nan"),
        "skipped_empty": skipped,
    }


def read_texts_jsonl(paths: Sequence[str | os.PathLike], lang: str | None = None) -> dict[str, list[str]]:
    """{lang: texts} from JSONL rows with `text` and `lang` (or every row in `lang` when given)."""
    out: dict[str, list[str]] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such text file")
        for where, _, row in iter_jsonl(path, EvalDataError):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise EvalDataError(
                    f"{where}: needs a string field 'text' (and 'lang'); got {str(row)[:80]!r}"
                )
            row_lang = lang or row.get("lang")
            if not isinstance(row_lang, str) or not row_lang:
                raise EvalDataError(
                    f"{where}: field 'lang' = {row.get('lang')!r}: give a language code or --lang"
                )
            out.setdefault(row_lang, []).append(row["text"])
    if not out:
        raise EvalDataError(f"{', '.join(map(str, paths))}: no texts")
    return out


def read_texts_shards(
    index_or_dir: str | os.PathLike, split: str = "heldout", sources: Sequence[str] | None = None
) -> dict[str, list[str]]:
    """{source: texts} of token shards' `split`, decoded with the shards' own tokenizer."""
    from quintet.data.shards import iter_documents, load_index
    from quintet.tokenizer import HFTokenizer

    index = load_index(index_or_dir)
    tokenizer = HFTokenizer(Path(index["root"]) / index["tokenizer"]["file"])
    names = list(sources) if sources else list(index["sources"])
    out = {}
    for source in names:
        if source not in index["sources"]:
            raise EvalDataError(
                f"{index['root']}: no source {source!r}; sources: {', '.join(index['sources'])}"
            )
        out[source] = [tokenizer.decode(doc.tolist()) for doc in iter_documents(index, source, split)]
    return out


def load_eval_texts(data: Sequence[str | os.PathLike], lang: str | None = None) -> dict[str, list[str]]:
    """A token-shard folder (its held-out split) or JSONL files, as {lang: texts}."""
    if len(data) == 1 and (Path(data[0]).is_dir() or Path(data[0]).name == "index.json"):
        return read_texts_shards(data[0])
    return read_texts_jsonl(data, lang)


def evaluate_perplexity(
    model_dir: str | os.PathLike,
    data: Sequence[str | os.PathLike],
    max_length: int = 1024,
    batch_size: int = 4,
    max_documents: int | None = None,
    lang: str | None = None,
    out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Perplexity and bits-per-byte per language of a model folder on held-out data; optional JSON output."""
    from quintet.io import atomic_write_text

    model, tokenizer = load_model_and_tokenizer(model_dir)
    texts = load_eval_texts(data, lang)
    if max_documents is not None:
        texts = {k: v[:max_documents] for k, v in texts.items()}
    result = {
        "model": str(model_dir),
        "data": [str(d) for d in data],
        "max_length": max_length,
        "languages": perplexity_by_language(model, tokenizer, texts, max_length, batch_size),
    }
    if out is not None:
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    return result
