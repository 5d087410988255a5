"""DPO training with a cached reference.

Pairs become tokens by TRL's rules (`quintet.align.sequences`: string prompts as given, conversations
through the chat template, `truncation_mode`, pairs whose prompt fills `max_length` dropped). The
reference runs the policy's own ops (`quintet.models.jamba.training_numerics`), so at step 0 the policy and
reference log-probs are equal and every implicit reward is exactly 0. For a mixture-of-experts model the
router load-balancing loss is added as TRL adds it, `router_aux_loss_coef * aux_loss`, and logged as
`aux_loss`. Metrics carry TRL's names (`learning_rate`, `grad_norm`, `rewards/*`, `logps/*`,
`logits/chosen`, `logits/rejected`) plus ours (`lr`, `ref/margin`).

The reference model's log-probs of every chosen and rejected response are computed once and stored in
`cache_dir` as safetensors under a key made of the reference weights' hash, the data's hash and the
settings that change the numbers (max length, truncation mode, chat template, length-averaging). Change
the model or the data and the key changes, so a stale cache is never read. With
`precompute_reference=False` a live reference is run at every step instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from quintet.align.loop import check_settings, train_loop
from quintet.align.losses import LOSS_TYPES, preference_loss, preference_metrics
from quintet.align.preference_data import PreferencePair
from quintet.align.sequences import (
    TRL_DEFAULTS,
    Example,
    Scores,
    Tokenization,
    as_tokenization,
    encode_pair,
    pad_batch,
    real_tokens,
    router_aux_loss_coef,
    score_completions,
)
from quintet.io import atomic_path
from quintet.models.jamba import training_numerics
from quintet.tokenizer import TextTokenizer

log = logging.getLogger("quintet.align")


@dataclass
class DPOConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    lr: float = 5e-6
    min_lr: float = 0.0
    warmup: float = 0.1
    schedule: str = "cosine"
    epochs: int = 1
    batch_size: int = 8
    max_length: int | None = 1024  # TRL's default; prompt + completion tokens
    truncation_mode: str = "keep_start"  # or "keep_end" (TRL's modes)
    chat_template: bool = False  # wrap string prompts in the model folder's chat template
    router_aux_loss_coef: float | None = None  # None: the model config's (MoE models only)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    precompute_reference: bool = True
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"DPOConfig.loss_type = {self.loss_type!r}: valid: {', '.join(LOSS_TYPES)}")
        check_settings(self, "DPOConfig")
        if not self.beta > 0:
            raise ValueError(f"DPOConfig.beta = {self.beta!r}: must be > 0")

    @property
    def tokenization(self) -> Tokenization:
        return Tokenization(self.max_length, self.truncation_mode, self.chat_template)


def model_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def data_hash(pairs: list[PreferencePair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.prompt, p.chosen, p.rejected], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def encode_pairs(
    tokenizer: TextTokenizer,
    pairs: list[PreferencePair],
    eos_id: int,
    settings: Tokenization | DPOConfig | int,
    drop: bool = True,
) -> tuple[list[int], list[tuple[Example, Example]]]:
    """(indices of the pairs kept, their (chosen, rejected) examples). With `drop`, pairs TRL drops (a
    prompt that fills `max_length` under `keep_start`) are left out, with a warning naming how many."""
    tokenization = as_tokenization(settings)
    kept, examples = [], []
    for i, p in enumerate(pairs):
        pair = encode_pair(tokenizer, p.prompt, p.chosen, p.rejected, eos_id, tokenization, drop)
        if pair is not None:
            kept.append(i)
            examples.append(pair)
    if len(kept) < len(pairs):
        log.warning(
            "%d of %d preference pairs dropped: the prompt alone fills max_length = %s, leaving no response "
            "token (TRL drops them too; raise max_length or use truncation_mode = 'keep_end')",
            len(pairs) - len(kept), len(pairs), tokenization.max_length,
        )  # fmt: skip
    if not examples:
        raise ValueError(f"no preference pair fits max_length = {tokenization.max_length}")
    return kept, examples


def score_pairs(
    model: torch.nn.Module,
    examples: list[tuple[Example, Example]],
    average: bool = False,
    aux_loss: bool = False,
) -> Scores:
    """One forward over the chosen rows then the rejected rows (2b): per-row scores (`score_completions`)."""
    rows = [c for c, _ in examples] + [r for _, r in examples]
    ids, mask = pad_batch(rows, model.config.pad_token_id or 0)
    real = real_tokens(rows, ids.shape[1]).to(model.device)
    return score_completions(model, ids.to(model.device), mask.to(model.device), average, real, aux_loss)


def pair_logps(
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    pairs: list[PreferencePair],
    settings: Tokenization | DPOConfig | int = TRL_DEFAULTS,
    average: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the chosen and of the rejected responses, (b,) each, of every pair (a pair whose prompt
    fills `max_length` scores 0 for both)."""
    _, examples = encode_pairs(tokenizer, pairs, model.config.eos_token_ids[0], settings, drop=False)
    logps = score_pairs(model, examples, average).logps
    return logps[: len(pairs)], logps[len(pairs) :]


@torch.no_grad()
def reference_logps(
    ref_model: torch.nn.Module,
    tokenizer: TextTokenizer,
    pairs: list[PreferencePair],
    cfg: DPOConfig,
    progress: bool = False,
    desc: str = "reference",
) -> torch.Tensor:
    """(n, 2) reference log-probs (chosen, rejected) of the pairs `encode_pairs` keeps, read from the cache
    when the key matches. Computed with the policy's ops (`training_numerics`)."""
    average = cfg.loss_type == "ipo"
    t = cfg.tokenization
    key = (
        f"ref-{model_hash(ref_model)}-data-{data_hash(pairs)}-len{t.max_length}-{t.truncation_mode}"
        f"-chat{int(t.chat_template)}-avg{int(average)}-trl"
    )
    path = Path(cfg.cache_dir) / f"{key}.safetensors" if cfg.cache_dir else None
    if path is not None and path.is_file():
        log.info("reference log-probs from cache %s", path)
        return load_file(path)["logps"]
    _, examples = encode_pairs(tokenizer, pairs, ref_model.config.eos_token_ids[0], cfg)
    log.info("reference log-probs of %d pairs (a forward pass of the reference model each)", len(examples))
    was_training = ref_model.training
    ref_model.eval()
    out = []
    with training_numerics():
        starts = range(0, len(examples), cfg.batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
            chunk = examples[start : start + cfg.batch_size]
            logps = score_pairs(ref_model, chunk, average).logps
            out.append(torch.stack([logps[: len(chunk)], logps[len(chunk) :]], dim=1).cpu())
    ref_model.train(was_training)
    result = torch.cat(out)
    if path is not None:
        with atomic_path(path) as tmp:
            save_file({"logps": result.contiguous()}, str(tmp))
    return result


def _logits_mean(scores: Scores, rows: slice) -> float:
    """TRL's `logits/*`: the vocabulary-mean logit averaged over every scored token of the rows."""
    count = float(scores.counts[rows].sum())
    return float(scores.logit_sums[rows].sum()) / count if count else 0.0


def train_dpo(
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    pairs: list[PreferencePair],
    cfg: DPOConfig,
    ref_model: torch.nn.Module | None = None,
    ref: torch.Tensor | None = None,
    progress: bool = True,
    desc: str = "dpo",
) -> list[dict[str, float]]:
    """Train `model` in place on `pairs`; return one metrics dict per optimizer step (TRL's names).

    The reference is `ref` (precomputed (n, 2) log-probs of the pairs `encode_pairs` keeps) if given, else
    `ref_model` (cached on disk through `reference_logps` when `cfg.precompute_reference`, or run live at
    every step). `desc` names the progress bar (sDPO: which step).
    """
    if ref is None and ref_model is None:
        raise ValueError("train_dpo: give a reference model or precomputed reference log-probs")
    coef = router_aux_loss_coef(model, cfg.router_aux_loss_coef)
    _, examples = encode_pairs(tokenizer, pairs, model.config.eos_token_ids[0], cfg)
    if ref is None and cfg.precompute_reference:
        ref = reference_logps(ref_model, tokenizer, pairs, cfg, progress, f"{desc}: reference")
    if ref is not None and ref.shape != (len(examples), 2):
        raise ValueError(f"reference log-probs: shape {tuple(ref.shape)}, expected ({len(examples)}, 2)")
    average = cfg.loss_type == "ipo"

    def step_fn(idx: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = [examples[i] for i in idx]
        n = len(batch)
        scores = score_pairs(model, batch, average, aux_loss=coef != 0)
        chosen, rejected = scores.logps[:n], scores.logps[n:]
        if ref is not None:
            ref_chosen, ref_rejected = ref[idx, 0].to(chosen), ref[idx, 1].to(chosen)
        else:
            with torch.no_grad(), training_numerics():
                ref_logps = score_pairs(ref_model, batch, average).logps
            ref_chosen, ref_rejected = ref_logps[:n], ref_logps[n:]
        loss = preference_loss(
            chosen, rejected, ref_chosen, ref_rejected, cfg.beta, cfg.loss_type, cfg.label_smoothing
        ).mean()
        if scores.aux_loss is not None:
            loss = loss + coef * scores.aux_loss
        metrics = preference_metrics(chosen, rejected, ref_chosen, ref_rejected, cfg.beta)
        metrics["logits/chosen"] = _logits_mean(scores, slice(0, n))
        metrics["logits/rejected"] = _logits_mean(scores, slice(n, 2 * n))
        if scores.aux_loss is not None:
            metrics["aux_loss"] = scores.aux_loss.item()
        return loss, metrics

    return train_loop(model, len(examples), cfg, step_fn, desc, progress, _show_loss_and_accuracy)


def _show_loss_and_accuracy(record: dict[str, float]) -> dict[str, str]:
    return {"loss": f"{record['loss']:.3f}", "acc": f"{record['rewards/accuracies']:.2f}"}


@torch.no_grad()
def preference_accuracy(
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    pairs: list[PreferencePair],
    settings: Tokenization | DPOConfig | int = TRL_DEFAULTS,
) -> float:
    """Fraction of pairs where the model gives the chosen response a higher log-prob than the rejected."""
    log.info("preference accuracy on %d held-out pairs", len(pairs))
    was_training = model.training
    model.eval()
    wins = 0
    for start in range(0, len(pairs), 16):
        chosen, rejected = pair_logps(model, tokenizer, pairs[start : start + 16], settings)
        wins += int((chosen > rejected).sum())
    model.train(was_training)
    return wins / len(pairs)
