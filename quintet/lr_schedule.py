"""Learning-rate schedules, for every trainer: linear warmup from zero, then cosine, linear or constant down
to `min_lr`. `lr_at` takes the run's progress (the LM trainer, SFT, DPO, sDPO); `lr_at_step` counts steps
(the vision trainer: warmup reaches `lr` at step `warmup_steps - 1`, decay starts at `warmup_steps`)."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def lr_at(
    progress: float, lr: float, min_lr: float = 0.0, warmup: float = 0.0, schedule: str = "cosine"
) -> float:
    """Learning rate at `progress` in [0, 1] of a run; `warmup` is a fraction of the run."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup and progress < warmup:
        return lr * progress / warmup
    if schedule == "constant":
        return lr
    decay = (progress - warmup) / (1 - warmup)
    if schedule == "linear":
        return lr - (lr - min_lr) * decay
    if schedule == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * decay))
    raise ValueError(f"schedule = {schedule!r}: valid: {', '.join(SCHEDULES)}")


def lr_at_step(
    step: int, steps: int, lr: float, min_lr: float = 0.0, warmup_steps: int = 0, schedule: str = "cosine"
) -> float:
    """Learning rate at 0-based `step` of `steps`, with `warmup_steps` steps of linear warmup."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr_at((step - warmup_steps) / max(1, steps - warmup_steps), lr, min_lr, 0.0, schedule)
