"""Prompt + response token sequences, and the log-probability a model gives a response.

A prompt is rendered as a one-turn chat (`quintet.chat.render_prompt`: the tokenizer folder's chat
template when it has one, else the plain template) so that SFT, DPO and generation all see the same
format. The response is followed by the end-of-sequence token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quintet.chat import render_prompt
from quintet.tokenizer import TextTokenizer


@dataclass
class Example:
    ids: list[int]
    prompt_len: int  # the first prompt_len ids are the prompt; the rest is the response (+ eos)
    response_mask: list[bool] | None = None  # per token, for packed rows holding several examples


def encode_example(
    tokenizer: TextTokenizer, prompt: str, response: str, eos_id: int, max_len: int
) -> Example:
    """Prompt then response then eos; long examples keep the prompt's end and cut the response's end."""
    prompt_ids = render_prompt(tokenizer, prompt)
    response_ids = tokenizer.encode(response) + [eos_id]
    if len(prompt_ids) >= max_len // 2 and len(prompt_ids) + len(response_ids) > max_len:
        prompt_ids = prompt_ids[-(max_len // 2) :]
    ids = (prompt_ids + response_ids)[:max_len]
    return Example(ids, len(prompt_ids))


def pad_batch(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (b, T) and a mask (b, T) of response tokens (the positions that are scored).

    Right padding is exact for scoring: a causal model's outputs at real positions never see later pads.
    """
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    response = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        if e.response_mask is not None:
            response[i, : len(e.ids)] = torch.tensor(e.response_mask)
        else:
            response[i, e.prompt_len : len(e.ids)] = True
    return ids, response


def response_logps(
    model: torch.nn.Module, ids: torch.Tensor, response_mask: torch.Tensor, average: bool = False
) -> torch.Tensor:
    """Sum (or mean) over response tokens of log p(token | everything before it), (b,)."""
    logits = model(ids).logits[:, :-1].float()
    targets = ids[:, 1:]
    mask = response_mask[:, 1:]
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total
