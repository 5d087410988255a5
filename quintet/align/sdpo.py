"""Stepwise DPO (sDPO, arXiv 2403.19270): preference data used in T steps instead of all at once.

Step t starts from the previous step's model M_{t-1} and uses M_{t-1} as its reference, so each step's
reference is better aligned than the last; M_0 is the SFT model. The paper orders the steps easy -> hard
(one source dataset per step) and finds a random split gives no gain over plain DPO.

How steps are formed (`split_steps`):
- `step`:       the pairs' own `step` field;
- `source`:     one step per source, in the order given;
- `easy_to_hard`: by difficulty as the SFT model sees it. The paper's wording is ambiguous (with M_0 as
                both policy and reference every implicit reward margin is zero), so we use the reference
                model's own log-prob margin  log M_0(y_w) - log M_0(y_l): the larger, the easier (M_0
                already prefers the chosen answer). Pairs are sorted by it and cut into T equal steps.
                Or an external `score` column (higher = easier) with `by="score"`.
- `random`:     a seeded random split into T equal steps (the paper's ablation).
"""

from __future__ import annotations

import copy
import logging
import random
from dataclasses import dataclass

import torch

from quintet.align.dpo import DPOConfig, model_hash, pair_logps, reference_logps, train_dpo
from quintet.align.preference_data import PreferencePair
from quintet.align.sequences import TRL_DEFAULTS, Tokenization
from quintet.tokenizer import TextTokenizer

log = logging.getLogger("quintet.align")

SPLITS = ("step", "source", "easy_to_hard", "score", "random")


@dataclass
class StepResult:
    step: int
    pairs: int
    reference_margin: float  # mean log ref(y_w) - log ref(y_l) over the step's pairs: the "lower bound"
    metrics: list[dict[str, float]]
    reference_hash: str  # weights hash of this step's reference (M_{t-1})
    output_hash: str  # weights hash of this step's result (M_t)


@torch.no_grad()
def reference_margins(
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    pairs: list[PreferencePair],
    settings: Tokenization | DPOConfig | int = TRL_DEFAULTS,
) -> torch.Tensor:
    model.eval()
    out = []
    for start in range(0, len(pairs), 16):
        chosen, rejected = pair_logps(model, tokenizer, pairs[start : start + 16], settings)
        out.append(chosen - rejected)
    return torch.cat(out)


def split_steps(
    pairs: list[PreferencePair],
    steps: int,
    by: str = "easy_to_hard",
    *,
    sources: list[str] | None = None,
    sft_model: torch.nn.Module | None = None,
    tokenizer: TextTokenizer | None = None,
    settings: Tokenization | DPOConfig | int = TRL_DEFAULTS,
    seed: int = 0,
) -> list[list[PreferencePair]]:
    """Cut `pairs` into `steps` ordered chunks (see the module docstring for each `by`)."""
    if by not in SPLITS:
        raise ValueError(f"by = {by!r}: valid: {', '.join(SPLITS)}")
    if by == "step":
        missing = [i for i, p in enumerate(pairs) if p.step is None]
        if missing:
            raise ValueError(f"by='step': pair {missing[0]} has no 'step' field")
        values = sorted({p.step for p in pairs})
        return [[p for p in pairs if p.step == v] for v in values]
    if by == "source":
        order = sources or sorted({p.source for p in pairs if p.source is not None})
        unknown = sorted({str(p.source) for p in pairs} - set(order))
        if unknown:
            raise ValueError(f"by='source': pairs with source(s) {unknown} not in the order {order}")
        return [[p for p in pairs if p.source == s] for s in order]
    if not isinstance(steps, int) or steps < 1 or steps > len(pairs):
        raise ValueError(f"steps = {steps!r}: must be between 1 and the number of pairs ({len(pairs)})")
    if by == "random":
        ordered = list(pairs)
        random.Random(seed).shuffle(ordered)
    elif by == "score":
        if any(p.score is None for p in pairs):
            raise ValueError("by='score': every pair needs a numeric 'score' (higher = easier)")
        ordered = sorted(pairs, key=lambda p: -p.score)
    else:
        if sft_model is None or tokenizer is None:
            raise ValueError("by='easy_to_hard' needs the SFT model and its tokenizer to measure difficulty")
        log.info("easy_to_hard: the SFT model's margin on each of %d pairs", len(pairs))
        margins = reference_margins(sft_model, tokenizer, pairs, settings).tolist()
        ordered = [p for _, p in sorted(zip(margins, pairs, strict=True), key=lambda mp: -mp[0])]
    size = -(-len(ordered) // steps)
    return [ordered[i * size : (i + 1) * size] for i in range(steps) if ordered[i * size : (i + 1) * size]]


def train_sdpo(
    sft_model: torch.nn.Module,
    tokenizer: TextTokenizer,
    step_pairs: list[list[PreferencePair]],
    cfg: DPOConfig,
    progress: bool = True,
) -> tuple[torch.nn.Module, list[StepResult]]:
    """Run DPO once per step; step t trains M_{t-1} against a frozen copy of M_{t-1}. Returns M_T.
    The progress bars say which step they belong to (`sdpo step 1/2`)."""
    model = sft_model
    results = []
    for t, pairs in enumerate(step_pairs, start=1):
        desc = f"sdpo step {t}/{len(step_pairs)}"
        reference = copy.deepcopy(model).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
        ref = reference_logps(reference, tokenizer, pairs, cfg, progress, f"{desc}: reference")
        margin = float((ref[:, 0] - ref[:, 1]).mean())
        metrics = train_dpo(model, tokenizer, pairs, cfg, ref=ref, progress=progress, desc=desc)
        results.append(
            StepResult(
                step=t,
                pairs=len(pairs),
                reference_margin=margin,
                metrics=metrics,
                reference_hash=model_hash(reference),
                output_hash=model_hash(model),
            )
        )
        del reference
    return model, results
