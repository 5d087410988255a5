"""Learning-rate schedules: linear warmup from zero, then cosine, linear or constant down to `min_lr`."""

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
