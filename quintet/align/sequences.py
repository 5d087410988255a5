"""Prompt + completion token sequences by TRL's rules, and the log-probability a model gives a completion.

The rules are those of TRL 1.16's `SFTTrainer._prepare_dataset` and `DPOTrainer._prepare_dataset` (tested
against TRL itself, tests/test_align_trl_parity.py):

- A string prompt is used as given: no chat template. The completion gets the end-of-sequence token (its
  text appended unless the completion already ends with it; the byte-level tokenizer, which has no text
  for it, gets the eos id). `prompt` and `prompt + completion` are tokenized with the tokenizer's own
  special tokens (its post-processor: transformers' `tokenizer(text)`).
- A conversational row (messages: lists of `{"role", "content"}`) goes through the chat template: the
  prompt with the generation prompt, prompt + completion without, no post-processor tokens
  (`apply_chat_template(tokenize=True)`). The template ends the turn; a tokenizer without a template gets
  quintet's plain template (`quintet.chat`), which has no end-of-turn token, so the eos id follows.
- `chat_template=True` makes a string row conversational first: the prompt one user turn, the completion
  one assistant turn.
- The completion starts where the two token lists diverge (TRL's `common_prefix_length`; normally after
  the whole prompt). For a preference pair, where either of chosen and rejected diverges.
- `truncation_mode`: `keep_start` (TRL's default) keeps the first `max_length` tokens, `keep_end` the
  last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from quintet.chat import chat_text, check_messages
from quintet.models.jamba.moe import load_balancing_loss
from quintet.tokenizer import ByteTokenizer, TextTokenizer

TRUNCATION_MODES = ("keep_start", "keep_end")
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Tokenization:
    """How rows become token sequences: the `[sft]` / `[dpo]` settings of the same names."""

    max_length: int | None = 1024
    truncation_mode: str = "keep_start"
    chat_template: bool = False

    def __post_init__(self) -> None:
        check_tokenization(self.max_length, self.truncation_mode)


def check_tokenization(max_length: Any, truncation_mode: Any, owner: str = "") -> None:
    """The `max_length` and `truncation_mode` settings checked; errors name `owner.field` (a config)."""
    prefix = f"{owner}." if owner else ""
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(
            f"{prefix}truncation_mode = {truncation_mode!r}: valid: {', '.join(TRUNCATION_MODES)}"
        )
    if max_length is not None and (
        not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2
    ):
        raise ValueError(f"{prefix}max_length = {max_length!r}: must be an integer >= 2 (or unset: no limit)")


TRL_DEFAULTS = Tokenization()  # max_length 1024, keep_start, no chat template for string rows


def as_tokenization(settings: Any) -> Tokenization:
    """A `Tokenization` from one, from a config with a `tokenization` (SFTConfig, DPOConfig), or from a
    bare max_length."""
    if isinstance(settings, Tokenization):
        return settings
    if isinstance(settings, int):
        return Tokenization(max_length=settings)
    return settings.tokenization


@dataclass
class Example:
    ids: list[int]
    prompt_len: int  # the first prompt_len ids are the prompt; the rest is the completion (+ eos)
    response_mask: list[bool] | None = None  # per token, for packed rows holding several examples


def is_conversation(value: Any) -> bool:
    """A list of messages (TRL's `is_conversational`: a list whose items are dicts with a role)."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def as_conversation(prompt: str | Messages, completion: str | Messages) -> tuple[Messages, Messages]:
    """A string row as one user turn and one assistant turn (the `chat_template = true` setting)."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    return prompt, completion


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def eos_text(tokenizer: TextTokenizer, eos_id: int) -> str | None:
    """The eos token as text (tokenizer_config.json's, else the vocabulary's entry for `eos_id`), or None
    for the byte-level tokenizer, whose special ids have no text."""
    if isinstance(tokenizer, ByteTokenizer):
        return None
    text = getattr(tokenizer, "eos_token", None)
    if not text and hasattr(tokenizer, "token_text"):
        text = tokenizer.token_text(eos_id)
    return text or None


def text_ids(tokenizer: TextTokenizer, text: str, eos_id: int | None = None) -> list[int]:
    """`text` (+ the eos token when `eos_id` is given) with the tokenizer's post-processor tokens."""
    eos = None if eos_id is None else eos_text(tokenizer, eos_id)
    if eos is not None and not text.endswith(eos):
        text += eos
    ids = tokenizer.encode(text, add_special_tokens=True)
    return ids + [eos_id] if eos_id is not None and eos is None else ids


def conversation_ids(
    tokenizer: TextTokenizer, messages: Messages, eos_id: int, add_generation_prompt: bool = False
) -> list[int]:
    """`messages` through the chat template (plain template + eos id without a folder template)."""
    check_messages(messages)
    ids = tokenizer.encode(chat_text(tokenizer, messages, add_generation_prompt))
    if not add_generation_prompt and not getattr(tokenizer, "chat_template", None):
        ids.append(eos_id)
    return ids


def prompt_completion_ids(
    tokenizer: TextTokenizer,
    prompt: str | Messages,
    completion: str | Messages,
    eos_id: int,
    chat_template: bool = False,
) -> tuple[list[int], list[int]]:
    """(prompt ids, prompt + completion ids) by the rules in the module docstring."""
    if chat_template:
        prompt, completion = as_conversation(prompt, completion)
    if isinstance(prompt, list) != isinstance(completion, list):
        raise ValueError("a row's prompt and completion must both be strings or both be lists of messages")
    if isinstance(prompt, list):
        return (
            conversation_ids(tokenizer, prompt, eos_id, add_generation_prompt=True),
            conversation_ids(tokenizer, prompt + completion, eos_id),
        )
    return text_ids(tokenizer, prompt), text_ids(tokenizer, prompt + completion, eos_id)


def truncate(example: Example, max_length: int | None, mode: str = "keep_start") -> Example:
    """The first (`keep_start`) or last (`keep_end`) `max_length` tokens, with their mask."""
    if mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode = {mode!r}: valid: {', '.join(TRUNCATION_MODES)}")
    if max_length is None or len(example.ids) <= max_length:
        return example
    cut = slice(None, max_length) if mode == "keep_start" else slice(len(example.ids) - max_length, None)
    mask = example.response_mask
    if mask is None:
        mask = [False] * example.prompt_len + [True] * (len(example.ids) - example.prompt_len)
    mask = mask[cut]
    prompt_len = next((i for i, m in enumerate(mask) if m), len(mask))
    return Example(example.ids[cut], prompt_len, None if all(mask[prompt_len:]) else mask)


def encode_example(
    tokenizer: TextTokenizer,
    prompt: str | Messages,
    completion: str | Messages,
    eos_id: int,
    tokenization: Tokenization | int = TRL_DEFAULTS,
) -> Example:
    """One prompt + completion example (SFT's prompt-completion rows), truncated."""
    tokenization = as_tokenization(tokenization)
    prompt_ids, ids = prompt_completion_ids(tokenizer, prompt, completion, eos_id, tokenization.chat_template)
    example = Example(ids, common_prefix_length(prompt_ids, ids))
    return truncate(example, tokenization.max_length, tokenization.truncation_mode)


def encode_pair(
    tokenizer: TextTokenizer,
    prompt: str | Messages,
    chosen: str | Messages,
    rejected: str | Messages,
    eos_id: int,
    tokenization: Tokenization | int = TRL_DEFAULTS,
    drop: bool = True,
) -> tuple[Example, Example] | None:
    """(chosen, rejected) examples of one preference pair, truncated. None where TRL drops the pair (with
    `drop`): with `keep_start`, a prompt that fills `max_length` on its own leaves no completion token."""
    tokenization = as_tokenization(tokenization)
    chat, max_length, mode = tokenization.chat_template, tokenization.max_length, tokenization.truncation_mode
    prompt_ids, chosen_ids = prompt_completion_ids(tokenizer, prompt, chosen, eos_id, chat)
    _, rejected_ids = prompt_completion_ids(tokenizer, prompt, rejected, eos_id, chat)
    prompt_len = min(
        common_prefix_length(prompt_ids, chosen_ids), common_prefix_length(prompt_ids, rejected_ids)
    )
    if drop and max_length is not None and mode == "keep_start" and prompt_len >= max_length:
        return None
    return (
        truncate(Example(chosen_ids, prompt_len), max_length, mode),
        truncate(Example(rejected_ids, prompt_len), max_length, mode),
    )


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


def real_tokens(examples: list[Example], width: int) -> torch.Tensor:
    """(b, width) bool: True at each example's tokens, False at the padding after them."""
    lengths = torch.tensor([len(e.ids) for e in examples])
    return torch.arange(width)[None, :] < lengths[:, None]


def has_router(model: torch.nn.Module) -> bool:
    """Whether the model has mixture-of-experts layers (and so a router load-balancing loss)."""
    return any(n > 1 for n in model.config.layers_num_experts)


def router_aux_loss_coef(model: torch.nn.Module, coef: float | None) -> float:
    """TRL's rule: the configured coefficient, else the model config's `router_aux_loss_coef`; 0 for a
    model without experts (a coefficient set for one is an error, as in TRL)."""
    if not has_router(model):
        if coef:
            raise ValueError(
                f"router_aux_loss_coef = {coef!r}: the model has no mixture-of-experts layer "
                "(num_experts = 1), so there is no router loss to weight; leave it unset or 0"
            )
        return 0.0
    return float(model.config.router_aux_loss_coef if coef is None else coef)


@dataclass
class Scores:
    """What one forward gives: per row, the completion's log-prob (sum or mean over its tokens), the sum
    of the vocabulary-mean logit at the positions predicting it and their count (TRL's `logits/*`), and
    the router load-balancing loss over the real tokens (None without `aux_loss` or experts)."""

    logps: torch.Tensor
    logit_sums: torch.Tensor
    counts: torch.Tensor
    aux_loss: torch.Tensor | None = None


def score_completions(
    model: torch.nn.Module,
    ids: torch.Tensor,
    response_mask: torch.Tensor,
    average: bool = False,
    real: torch.Tensor | None = None,
    aux_loss: bool = False,
) -> Scores:
    """Completion log-probs of a right-padded batch; with `aux_loss`, the router loss (transformers'
    Jamba load-balancing loss, `quintet.models.jamba.moe`) over the tokens `real` marks."""
    out = model(ids, output_router_logits=aux_loss)
    logits = out.logits[:, :-1].float()
    mask = response_mask[:, 1:]
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    total = (token_logps * mask).sum(-1)
    counts = mask.sum(-1)
    logps = total / counts.clamp(min=1) if average else total
    logit_sums = (logits.detach().mean(-1) * mask).sum(-1)
    aux = None
    if aux_loss and out.router_logits:
        cfg = model.config
        aux = load_balancing_loss(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok, real)
    return Scores(logps, logit_sums, counts, aux)


def response_logps(
    model: torch.nn.Module, ids: torch.Tensor, response_mask: torch.Tensor, average: bool = False
) -> torch.Tensor:
    """Sum (or mean) over response tokens of log p(token | everything before it), (b,)."""
    return score_completions(model, ids, response_mask, average).logps
