"""DPO training with a cached reference.

The reference model's log-probs of every chosen and rejected response are computed once and stored in
`cache_dir` as safetensors under a key made of the reference weights' hash, the data's hash and the
settings that change the numbers (max length, length-averaging). Change the model or the data and the key
changes, so a stale cache is never read. With `precompute_reference=False` a live reference is run at
every step instead.
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

from quintet.align.loop import optimizer_step, scheduled_batches
from quintet.align.losses import LOSS_TYPES, preference_loss, preference_metrics
from quintet.align.preference_data import PreferencePair
from quintet.align.sequences import encode_example, pad_batch, response_logps
from quintet.io import atomic_path
from quintet.lr_schedule import SCHEDULES
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
    max_length: int = 256
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    precompute_reference: bool = True
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"DPOConfig.loss_type = {self.loss_type!r}: valid: {', '.join(LOSS_TYPES)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"DPOConfig.schedule = {self.schedule!r}: valid: {', '.join(SCHEDULES)}")
        for name in ("epochs", "batch_size", "max_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"DPOConfig.{name} = {getattr(self, name)!r}: must be a positive integer")
        if not self.beta > 0:
            raise ValueError(f"DPOConfig.beta = {self.beta!r}: must be > 0")


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


def _pair_batches(
    tokenizer: TextTokenizer, pairs: list[PreferencePair], eos_id: int, pad_id: int, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows: ids (2b, T) and response masks (2b, T)."""
    examples = [encode_example(tokenizer, p.prompt, p.chosen, eos_id, max_len) for p in pairs]
    examples += [encode_example(tokenizer, p.prompt, p.rejected, eos_id, max_len) for p in pairs]
    return pad_batch(examples, pad_id)


def pair_logps(
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    pairs: list[PreferencePair],
    max_len: int,
    average: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the chosen and of the rejected responses, (b,) each."""
    cfg = model.config
    ids, mask = _pair_batches(tokenizer, pairs, cfg.eos_token_ids[0], cfg.pad_token_id or 0, max_len)
    logps = response_logps(model, ids.to(model.device), mask.to(model.device), average=average)
    return logps[: len(pairs)], logps[len(pairs) :]


@torch.no_grad()
def reference_logps(
    ref_model: torch.nn.Module,
    tokenizer: TextTokenizer,
    pairs: list[PreferencePair],
    cfg: DPOConfig,
) -> torch.Tensor:
    """(n, 2) reference log-probs (chosen, rejected), read from the cache when the key matches."""
    average = cfg.loss_type == "ipo"
    key = f"ref-{model_hash(ref_model)}-data-{data_hash(pairs)}-len{cfg.max_length}-avg{int(average)}"
    path = Path(cfg.cache_dir) / f"{key}.safetensors" if cfg.cache_dir else None
    if path is not None and path.is_file():
        log.info("reference log-probs from cache %s", path)
        return load_file(path)["logps"]
    log.info("reference log-probs of %d pairs (a forward pass of the reference model each)", len(pairs))
    was_training = ref_model.training
    ref_model.eval()
    out = []
    for start in range(0, len(pairs), cfg.batch_size):
        chunk = pairs[start : start + cfg.batch_size]
        chosen, rejected = pair_logps(ref_model, tokenizer, chunk, cfg.max_length, average)
        out.append(torch.stack([chosen, rejected], dim=1).cpu())
    ref_model.train(was_training)
    result = torch.cat(out)
    if path is not None:
        with atomic_path(path) as tmp:
            save_file({"logps": result.contiguous()}, str(tmp))
    return result


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
    `desc` names the progress bar (sDPO: which step).

    The reference is `ref` (precomputed (n, 2) log-probs) if given, else `ref_model` (cached on disk
    through `reference_logps` when `cfg.precompute_reference`, or run live at every step).
    """
    if ref is None and ref_model is None:
        raise ValueError("train_dpo: give a reference model or precomputed reference log-probs")
    if ref is None and cfg.precompute_reference:
        ref = reference_logps(ref_model, tokenizer, pairs, cfg)
    if ref is not None and ref.shape != (len(pairs), 2):
        raise ValueError(f"reference log-probs: shape {tuple(ref.shape)}, expected ({len(pairs)}, 2)")
    average = cfg.loss_type == "ipo"
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = scheduled_batches(
        len(pairs), cfg.batch_size, cfg.epochs, cfg.seed, cfg.lr, cfg.min_lr, cfg.warmup, cfg.schedule
    )
    history = []
    model.train()
    bar = tqdm(
        total=-(-len(pairs) // cfg.batch_size) * cfg.epochs, desc=desc, unit="step", disable=not progress
    )
    for step, idx, lr in batches:
        batch = [pairs[i] for i in idx]
        chosen, rejected = pair_logps(model, tokenizer, batch, cfg.max_length, average)
        if ref is not None:
            ref_chosen, ref_rejected = ref[idx, 0].to(chosen), ref[idx, 1].to(chosen)
        else:
            with torch.no_grad():
                ref_chosen, ref_rejected = pair_logps(ref_model, tokenizer, batch, cfg.max_length, average)
        loss = preference_loss(
            chosen, rejected, ref_chosen, ref_rejected, cfg.beta, cfg.loss_type, cfg.label_smoothing
        ).mean()
        optimizer_step(model, optimizer, loss, lr, cfg.grad_clip)
        record = {"step": step + 1, "loss": loss.item(), "lr": lr}
        record.update(preference_metrics(chosen, rejected, ref_chosen, ref_rejected, cfg.beta))
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['rewards/accuracies']:.2f}")
        bar.update()
    bar.close()
    model.eval()
    return history


@torch.no_grad()
def preference_accuracy(
    model: torch.nn.Module, tokenizer: TextTokenizer, pairs: list[PreferencePair], max_len: int = 256
) -> float:
    """Fraction of pairs where the model gives the chosen response a higher log-prob than the rejected."""
    log.info("preference accuracy on %d held-out pairs", len(pairs))
    was_training = model.training
    model.eval()
    wins = 0
    for start in range(0, len(pairs), 16):
        chosen, rejected = pair_logps(model, tokenizer, pairs[start : start + 16], max_len)
        wins += int((chosen > rejected).sum())
    model.train(was_training)
    return wins / len(pairs)
