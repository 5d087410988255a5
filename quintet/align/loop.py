"""The pieces SFT and DPO share: shuffled batches with a learning rate per step, and one optimizer step."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from quintet.lr_schedule import lr_at


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
