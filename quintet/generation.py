"""Text generation for quintet's causal language models: greedy or sampled, streamed, batched.

A batch of prompts is left-padded and masked, so each row yields exactly the tokens it yields alone.
Sampling draws row i from its own generator seeded with `seed + i`: a batch reproduces, row for row,
the same prompts sampled one at a time with those seeds.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from quintet.models.jamba import HybridCache, JambaForCausalLM
from quintet.tokenizer import StreamDecoder, TextTokenizer


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None  # None = the model's eos_token_id(s)
    vocab_limit: int | None = None  # generate only ids below this (a tokenizer smaller than the model)
    prefill_chunk_size: int = 2048  # prompts are fed in pieces of this many tokens: bounded activations

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens = {self.max_new_tokens!r}: must be an integer >= 0")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"temperature = {self.temperature!r}: must be >= 0 (0 = greedy decoding)")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature = {self.temperature!r}: must be > 0 when sampling")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k = {self.top_k!r}: must be an integer >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p = {self.top_p!r}: must be in (0, 1] (1 turns it off)")
        if self.vocab_limit is not None and (not isinstance(self.vocab_limit, int) or self.vocab_limit < 1):
            raise ValueError(f"vocab_limit = {self.vocab_limit!r}: must be a positive integer or None")
        if not isinstance(self.prefill_chunk_size, int) or self.prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size = {self.prefill_chunk_size!r}: must be a positive integer")


def _make_config(config: GenerationConfig | None, overrides: dict) -> GenerationConfig:
    values = {f.name: getattr(config, f.name) for f in fields(GenerationConfig)} if config else {}
    return GenerationConfig(**{**values, **overrides})


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set whose probability >= top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if not prompts:
        raise ValueError("prompts: empty list; give at least one prompt")
    if isinstance(prompts[0], int):
        prompts = [prompts]  # a single prompt
    out = []
    for i, p in enumerate(prompts):
        p = list(p)
        if not p:
            raise ValueError(f"prompt {i} is empty (0 tokens); every prompt needs at least one token")
        bad = [t for t in p if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i}: token id {bad[0]!r} is outside the vocabulary [0, {vocab_size})")
        out.append(p)
    return out


@torch.inference_mode()
def stream_generate(
    model: JambaForCausalLM,
    prompts: Sequence[Sequence[int]] | Sequence[int],
    config: GenerationConfig | None = None,
    **overrides,
) -> Iterator[list[int | None]]:
    """Yield, at each step, the new token of every row, or None for a row that has stopped.

    A row stops at a stop token (not yielded) or after `max_new_tokens`. `prompts` is a list of token-id
    lists (or one list); keyword arguments override fields of `config`.
    """
    cfg = _make_config(config, overrides)
    model_cfg = model.config
    rows = _check_prompts(prompts, model_cfg.vocab_size)
    stop = set(cfg.stop_token_ids if cfg.stop_token_ids is not None else model_cfg.eos_token_ids)
    pad_id = model_cfg.pad_token_id if model_cfg.pad_token_id is not None else 0
    device = model.device
    ids, mask = _left_pad(rows, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    padded = bool((mask == 0).any())
    generators = None
    if cfg.do_sample:
        base = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        generators = [torch.Generator(device=device).manual_seed(base + i) for i in range(len(rows))]

    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache()
        logits = prefill(model, ids, mask if padded else None, cache, cfg.prefill_chunk_size)
        done = [False] * len(rows)
        for step in range(cfg.max_new_tokens):
            next_ids = _pick(logits[:, -1].float(), cfg, generators)
            tokens = next_ids.tolist()
            out: list[int | None] = []
            for i, tok in enumerate(tokens):
                if not done[i] and tok in stop:
                    done[i] = True
                out.append(None if done[i] else tok)
            yield out
            if all(done) or step == cfg.max_new_tokens - 1:
                return
            if padded:
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            logits = model(
                next_ids[:, None], attention_mask=mask if padded else None, cache=cache, logits_to_keep=1
            ).logits
    finally:
        model.train(was_training)


def prefill(
    model: JambaForCausalLM,
    ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: HybridCache,
    chunk_size: int = 2048,
) -> torch.Tensor:
    """Feed a prompt into `cache` in pieces of `chunk_size` tokens; return the last logits (b, 1, V).

    Activation memory is bounded by the chunk, not the prompt: the Mamba state and the K/V carry across
    pieces exactly, so the result equals one forward over the whole prompt.
    """
    past = cache.get_seq_length()
    logits = None
    for start in range(0, ids.shape[1], chunk_size):
        end = min(start + chunk_size, ids.shape[1])
        mask = None if attention_mask is None else attention_mask[:, : past + end]
        logits = model(ids[:, start:end], attention_mask=mask, cache=cache, logits_to_keep=1).logits
    return logits


def argmax_last(scores: torch.Tensor) -> torch.Tensor:
    """`scores.argmax(-1)`, through NumPy for float32 CPU scores without gradients: PyTorch's CPU argmax
    takes ~30 us for one row of a 32k vocabulary, NumPy's ~4 us (a decode step is ~2 ms). Both return the
    first maximum."""
    if scores.device.type == "cpu" and scores.dtype == torch.float32 and not scores.requires_grad:
        return torch.from_numpy(np.asarray(scores.numpy().argmax(-1)))
    return scores.argmax(-1)


def _pick(
    logits: torch.Tensor, cfg: GenerationConfig, generators: list[torch.Generator] | None
) -> torch.Tensor:
    if cfg.vocab_limit is not None:
        logits = logits[:, : cfg.vocab_limit]
    if not cfg.do_sample:
        return argmax_last(logits)
    probs = torch.softmax(filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p), dim=-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


def generate(
    model: JambaForCausalLM,
    prompts: Sequence[Sequence[int]] | Sequence[int],
    config: GenerationConfig | None = None,
    **overrides,
) -> list[list[int]]:
    """The new tokens of each prompt (stop tokens excluded); see `stream_generate`."""
    rows = _check_prompts(prompts, model.config.vocab_size)
    out: list[list[int]] = [[] for _ in rows]
    for step in stream_generate(model, rows, config, **overrides):
        for i, tok in enumerate(step):
            if tok is not None:
                out[i].append(tok)
    return out


def stream_text(
    model: JambaForCausalLM,
    tokenizer: TextTokenizer,
    prompt: str,
    config: GenerationConfig | None = None,
    **overrides,
) -> Iterator[str]:
    """Generate from a text prompt and yield the continuation as text pieces, as they are produced.

    Only ids the tokenizer can decode are generated (`vocab_limit` defaults to the tokenizer's size).
    """
    if not prompt:
        raise ValueError("prompt: empty text; give at least one character")
    decoder = StreamDecoder(tokenizer)
    if config is None or config.vocab_limit is None:
        overrides.setdefault("vocab_limit", min(tokenizer.vocab_size, model.config.vocab_size))
    for step in stream_generate(model, [tokenizer.encode(prompt)], config, **overrides):
        if step[0] is not None:
            piece = decoder.push(step[0])
            if piece:
                yield piece
