"""Supervised fine-tuning on TRL's dataset formats, each tokenized as TRL's `SFTTrainer` does.

One JSONL row per example (`quintet.align.sequences` has the tokenization rules):
- `{"prompt": ..., "completion": ...}`: strings (used as given, the completion followed by eos) or two
  conversations (lists of `{"role", "content"}` messages); the loss is on the completion tokens only
  (TRL's `completion_only_loss` default for prompt-completion data);
- `{"messages": [...]}`: a whole conversation through the chat template, the loss on every token (TRL's
  default for conversational language-modeling data);
- `{"text": ...}`: plain text followed by eos, the loss on every token.

`chat_template = true` wraps string prompt-completion rows as a user turn and an assistant turn. Examples
longer than `max_length` are cut by `truncation_mode` (TRL's `keep_start` by default); examples left
without a scored token are dropped, as TRL does. With `packing`, several examples share a row of
`max_length` tokens (attention is not reset between them; only their scored tokens are scored). For a
mixture-of-experts model the router load-balancing loss is added, `router_aux_loss_coef * aux_loss`
(TRL's rule), and logged as `aux_loss`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from quintet.align.loop import check_settings, train_loop
from quintet.align.sequences import (
    Example,
    Tokenization,
    conversation_ids,
    encode_example,
    is_conversation,
    pad_batch,
    real_tokens,
    router_aux_loss_coef,
    text_ids,
    truncate,
)
from quintet.chat import check_messages
from quintet.io import check_row, read_records
from quintet.models.jamba.moe import load_balancing_loss
from quintet.tokenizer import TextTokenizer

log = logging.getLogger("quintet.align")


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
    max_length: int | None = 1024  # TRL's default
    truncation_mode: str = "keep_start"  # or "keep_end" (TRL's modes)
    chat_template: bool = False  # wrap string prompt-completion rows in the model folder's chat template
    router_aux_loss_coef: float | None = None  # None: the model config's (MoE models only)
    packing: bool = False
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_settings(self, "SFTConfig")
        if self.packing and self.max_length is None:
            raise ValueError("SFTConfig.packing = true needs a max_length (the packed row's length)")

    @property
    def tokenization(self) -> Tokenization:
        return Tokenization(self.max_length, self.truncation_mode, self.chat_template)


SFTRow = dict[str, Any]  # one of TRL's formats (module docstring)


def parse_sft_row(row: object, where: str) -> SFTRow:
    """The row's training fields (`prompt` + `completion`, `messages` or `text`), checked."""
    row = check_row(row, where, SFTDataError)
    if "messages" in row:
        try:
            check_messages(row["messages"])
        except ValueError as err:
            raise SFTDataError(f"{where}: field 'messages': {err}") from None
        if not row["messages"]:
            raise SFTDataError(f"{where}: field 'messages' is empty")
        return {"messages": row["messages"]}
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if is_conversation(prompt) or is_conversation(completion):
            for name in ("prompt", "completion"):
                try:
                    check_messages(row[name])
                except ValueError as err:
                    raise SFTDataError(f"{where}: field {name!r}: {err}") from None
        elif not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
            raise SFTDataError(
                f"{where}: prompt and completion must be strings (the completion non-empty) or both lists "
                "of {role, content} messages"
            )
        return {"prompt": prompt, "completion": completion}
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise SFTDataError(
                f"{where}: field 'text' = {str(row['text'])[:60]!r}: must be a non-empty string"
            )
        return {"text": row["text"]}
    raise SFTDataError(
        f"{where}: needs 'prompt' and 'completion', 'messages' or 'text'; got fields {sorted(row)}"
    )


def read_sft_examples(path: str | os.PathLike) -> list[SFTRow]:
    return read_records(path, parse_sft_row, SFTDataError, "SFT", "examples")


def encode_sft_row(
    tokenizer: TextTokenizer, row: SFTRow | tuple[str, str], eos_id: int, tokenization: Tokenization
) -> Example:
    """One row as token ids and its scored positions, truncated (a `(prompt, completion)` tuple is a
    prompt-completion row)."""
    if isinstance(row, tuple):
        row = {"prompt": row[0], "completion": row[1]}
    if "messages" in row:
        example = Example(conversation_ids(tokenizer, row["messages"], eos_id), 0)
    elif "text" in row:
        example = Example(text_ids(tokenizer, row["text"], eos_id), 0)
    else:
        return encode_example(tokenizer, row["prompt"], row["completion"], eos_id, tokenization)
    return truncate(example, tokenization.max_length, tokenization.truncation_mode)


def encode_sft_rows(
    tokenizer: TextTokenizer, rows: list[SFTRow | tuple[str, str]], eos_id: int, tokenization: Tokenization
) -> list[Example]:
    """Every row encoded; rows left without a scored token by truncation are dropped (as TRL drops them)."""
    encoded = [encode_sft_row(tokenizer, row, eos_id, tokenization) for row in rows]
    kept = [e for e in encoded if _scored(e)]
    if len(kept) < len(encoded):
        log.warning(
            "%d of %d SFT examples dropped: truncation to max_length = %s left no completion token",
            len(encoded) - len(kept), len(encoded), tokenization.max_length,
        )  # fmt: skip
    if not kept:
        raise ValueError(
            f"no SFT example keeps a completion token within max_length = {tokenization.max_length}"
        )
    return kept


def _scored(e: Example) -> bool:
    return any(e.response_mask) if e.response_mask is not None else e.prompt_len < len(e.ids)


def _pack(examples: list[Example], max_len: int) -> list[Example]:
    """Greedy packing of whole examples into rows of at most `max_len` tokens."""
    rows: list[Example] = []
    for e in examples:
        mask = e.response_mask or [False] * e.prompt_len + [True] * (len(e.ids) - e.prompt_len)
        if rows and len(rows[-1].ids) + len(e.ids) <= max_len:
            rows[-1].ids += e.ids
            rows[-1].response_mask += mask
        else:
            rows.append(Example(list(e.ids), 0, mask))
    return rows


def sft_losses(
    model: torch.nn.Module,
    ids: torch.Tensor,
    response: torch.Tensor,
    real: torch.Tensor | None = None,
    aux_loss: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean next-token cross entropy over response tokens, router loss over the `real` tokens or None)."""
    out = model(ids, output_router_logits=aux_loss)
    logits = out.logits[:, :-1].float()
    targets = ids[:, 1:].masked_fill(~response[:, 1:], -100)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    aux = None
    if aux_loss and out.router_logits:
        cfg = model.config
        aux = load_balancing_loss(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok, real)
    return ce, aux


def sft_loss(model: torch.nn.Module, ids: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over response tokens only."""
    return sft_losses(model, ids, response)[0]


def train_sft(
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    examples: list[SFTRow | tuple[str, str]],
    cfg: SFTConfig,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Fine-tune `model` in place; one metrics dict per optimizer step (`loss`, `learning_rate` and `lr`,
    `grad_norm`, and `aux_loss` for a mixture-of-experts model)."""
    mc = model.config
    coef = router_aux_loss_coef(model, cfg.router_aux_loss_coef)
    encoded = encode_sft_rows(tokenizer, examples, mc.eos_token_ids[0], cfg.tokenization)
    if cfg.packing:
        encoded = _pack(encoded, cfg.max_length)
    pad = mc.pad_token_id or 0

    def step_fn(idx: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        rows = [encoded[i] for i in idx]
        ids, response = pad_batch(rows, pad)
        real = real_tokens(rows, ids.shape[1]).to(model.device)
        ce, aux = sft_losses(model, ids.to(model.device), response.to(model.device), real, coef != 0)
        return (ce, {}) if aux is None else (ce + coef * aux, {"aux_loss": aux.item()})

    return train_loop(model, len(encoded), cfg, step_fn, "sft", progress)
