"""Supervised fine-tuning on chat-formatted examples, with the loss on response tokens only.

Examples are JSONL rows in TRL's conventions: `{"prompt": ..., "completion": ...}` or
`{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}` (the last
assistant turn is the response, the turn before it the prompt). With `packing`, several examples share a
row of `max_length` tokens (attention is not reset between them; only response tokens are scored).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from quintet.align.loop import optimizer_step, scheduled_batches
from quintet.align.sequences import Example, encode_example, pad_batch
from quintet.io import iter_jsonl
from quintet.lr_schedule import SCHEDULES
from quintet.tokenizer import TextTokenizer


class SFTDataError(ValueError):
    """An SFT example file has a row that cannot be trained on."""


@dataclass
class SFTConfig:
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup: float = 0.05
    schedule: str = "cosine"
    epochs: int = 1
    batch_size: int = 8
    max_length: int = 256
    packing: bool = False
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"SFTConfig.schedule = {self.schedule!r}: valid: {', '.join(SCHEDULES)}")
        for name in ("epochs", "batch_size", "max_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"SFTConfig.{name} = {getattr(self, name)!r}: must be a positive integer")


def parse_sft_row(row: object, where: str) -> tuple[str, str]:
    if not isinstance(row, dict):
        raise SFTDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        ok = isinstance(msgs, list) and len(msgs) >= 2 and all(isinstance(m, dict) for m in msgs)
        if not ok or msgs[-1].get("role") != "assistant" or msgs[-2].get("role") != "user":
            raise SFTDataError(f"{where}: 'messages' must end with a user turn then an assistant turn")
        prompt, response = msgs[-2].get("content"), msgs[-1].get("content")
    elif "prompt" in row and "completion" in row:
        prompt, response = row["prompt"], row["completion"]
    else:
        raise SFTDataError(
            f"{where}: needs 'prompt' and 'completion', or 'messages'; got fields {sorted(row)}"
        )
    if not isinstance(prompt, str) or not isinstance(response, str) or not response.strip():
        raise SFTDataError(f"{where}: prompt and response must be strings, the response non-empty")
    return prompt, response


def read_sft_examples(path: str | os.PathLike) -> list[tuple[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such SFT file")
    rows = []
    for where, _, row in iter_jsonl(path, SFTDataError):
        rows.append(parse_sft_row(row, where))
    if not rows:
        raise SFTDataError(f"{path}: no examples in the file")
    return rows


def _pack(examples: list[Example], max_len: int) -> list[Example]:
    """Greedy packing of whole examples into rows of at most `max_len` tokens."""
    rows: list[Example] = []
    for e in examples:
        mask = [False] * e.prompt_len + [True] * (len(e.ids) - e.prompt_len)
        if rows and len(rows[-1].ids) + len(e.ids) <= max_len:
            rows[-1].ids += e.ids
            rows[-1].response_mask += mask
        else:
            rows.append(Example(list(e.ids), 0, mask))
    return rows


def sft_loss(model: torch.nn.Module, ids: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over response tokens only."""
    logits = model(ids).logits[:, :-1].float()
    targets = ids[:, 1:].masked_fill(~response[:, 1:], -100)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train_sft(
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    examples: list[tuple[str, str]],
    cfg: SFTConfig,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Fine-tune `model` in place; one metrics dict (loss, lr) per optimizer step."""
    mc = model.config
    encoded = [encode_example(tokenizer, p, r, mc.eos_token_ids[0], cfg.max_length) for p, r in examples]
    if cfg.packing:
        encoded = _pack(encoded, cfg.max_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = scheduled_batches(
        len(encoded), cfg.batch_size, cfg.epochs, cfg.seed, cfg.lr, cfg.min_lr, cfg.warmup, cfg.schedule
    )
    history = []
    model.train()
    bar = tqdm(
        total=-(-len(encoded) // cfg.batch_size) * cfg.epochs, desc="sft", unit="step", disable=not progress
    )
    for step, idx, lr in batches:
        ids, response = pad_batch([encoded[i] for i in idx], mc.pad_token_id or 0)
        loss = sft_loss(model, ids.to(model.device), response.to(model.device))
        optimizer_step(model, optimizer, loss, lr, cfg.grad_clip)
        history.append({"step": step + 1, "loss": loss.item(), "lr": lr})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
        bar.update()
    bar.close()
    model.eval()
    return history
