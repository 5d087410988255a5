"""The training loop SFT and DPO share: AdamW, shuffled batches with a learning rate per step, one
optimizer step each, a progress bar, and the per-step metrics under TRL's names."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from tqdm import tqdm

from quintet.align.sequences import check_tokenization
from quintet.lr_schedule import SCHEDULES, lr_at


def scheduled_batches(
    n: int, batch_size: int, epochs: int, seed: int, lr: float, min_lr: float, warmup: float, schedule: str
) -> Iterator[tuple[int, list[int], float]]:
    """`(step, indices, lr)` per batch: each epoch a fresh seeded permutation of `range(n)`."""
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-n // batch_size)
    total = steps_per_epoch * epochs
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen).tolist()
        for s in range(steps_per_epoch):
            step = epoch * steps_per_epoch + s
            indices = order[s * batch_size : (s + 1) * batch_size]
            yield step, indices, lr_at(step / total, lr, min_lr, warmup, schedule)


def optimizer_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float, grad_clip: float
) -> float:
    """Set the learning rate, backpropagate `loss`, clip (when `grad_clip` > 0) and step. Returns the
    gradients' total norm before clipping (what transformers' Trainer logs as `grad_norm`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip else float("inf"))
    optimizer.step()
    return float(norm)


class LoopSettings(Protocol):
    """The optimizer, schedule and length fields `SFTConfig` and `DPOConfig` both have."""

    lr: float
    min_lr: float
    warmup: float
    schedule: str
    epochs: int
    batch_size: int
    weight_decay: float
    grad_clip: float
    seed: int
    max_length: int | None
    truncation_mode: str


def check_settings(cfg: LoopSettings, owner: str) -> None:
    """The fields SFTConfig and DPOConfig share, checked (schedule, epochs, batch_size, max_length,
    truncation_mode); errors name `owner.field`, the value and what is valid."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"{owner}.schedule = {cfg.schedule!r}: valid: {', '.join(SCHEDULES)}")
    for name in ("epochs", "batch_size"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}.{name} = {value!r}: must be a positive integer")
    check_tokenization(cfg.max_length, cfg.truncation_mode, owner)


StepFn = Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]]


def _show_loss(record: dict[str, float]) -> dict[str, str]:
    return {"loss": f"{record['loss']:.3f}"}


def train_loop(
    model: torch.nn.Module,
    n: int,
    cfg: LoopSettings,
    step_fn: StepFn,
    desc: str,
    progress: bool = True,
    postfix: Callable[[dict[str, float]], dict[str, str]] = _show_loss,
) -> list[dict[str, float]]:
    """Train `model` in place over `n` examples; one metrics dict per optimizer step.

    AdamW (`cfg.lr`, `cfg.weight_decay`) on the model's parameters; `scheduled_batches` gives each step's
    example indices and learning rate; `step_fn(indices)` returns the step's loss and its own metrics; the
    loop steps the optimizer (`optimizer_step`) and records `step`, `loss`, `learning_rate` (TRL's name),
    `lr` (ours), `grad_norm`, then the step's metrics. The progress bar `desc` shows `postfix(record)`.
    The model is left in eval mode.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = scheduled_batches(
        n, cfg.batch_size, cfg.epochs, cfg.seed, cfg.lr, cfg.min_lr, cfg.warmup, cfg.schedule
    )
    history: list[dict[str, float]] = []
    model.train()
    total = -(-n // cfg.batch_size) * cfg.epochs
    with tqdm(total=total, desc=desc, unit="step", disable=not progress) as bar:
        for step, idx, lr in batches:
            loss, metrics = step_fn(idx)
            grad_norm = optimizer_step(model, optimizer, loss, lr, cfg.grad_clip)
            record = {
                "step": step + 1,
                "loss": loss.item(),
                "learning_rate": lr,
                "lr": lr,
                "grad_norm": grad_norm,
                **metrics,
            }
            history.append(record)
            bar.set_postfix(postfix(record))
            bar.update()
    model.eval()
    return history
