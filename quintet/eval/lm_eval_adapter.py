"""An lm-evaluation-harness model, `quintet`, for quintet's Jamba model folders.

lm-eval (0.4.x) finds models only in its own registry: it has no entry-point discovery for models, and
`--include_path` adds tasks, not models. So the registration must run in the same process first; this
module's `main` is lm-eval's own command line with `quintet` registered:

    python -m quintet.eval.lm_eval_adapter --model quintet --model_args pretrained=DIR \\
        --tasks my_task --include_path TASK_DIR [any other lm_eval argument]

(also `quintet eval lm-eval -- <lm_eval arguments>`). From Python, importing this module registers the
model for `lm_eval.simple_evaluate(model="quintet", ...)`, or pass `QuintetLM(...)` directly.

model_args: pretrained (the folder, required), batch_size (8), max_length (1024: the model's input length,
lm-eval's meaning: a scored sequence keeps its last max_length + 1 tokens and feeds all but the last; a
generation's context keeps its last max_length - max_gen_toks), max_gen_toks (256), dtype (float32 |
bfloat16 | float16). Log-likelihoods come from
`quintet.eval.multiple_choice.loglikelihoods` and rolling log-likelihoods from
`quintet.eval.perplexity.text_nll`, so lm-eval's numbers equal `quintet eval mc` / `perplexity` numbers.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from quintet.chat import chat_text
from quintet.eval.multiple_choice import loglikelihoods
from quintet.eval.perplexity import text_nll
from quintet.generation import GenerationConfig, stream_generate
from quintet.loading import load_model_and_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_model("quintet")
class QuintetLM(LM):
    def __init__(
        self,
        pretrained: str,
        batch_size: int | str | None = 8,
        max_length: int = 1024,
        max_gen_toks: int = 256,
        dtype: str = "float32",
        device: str | None = None,
        **_: Any,  # lm-eval passes max_batch_size etc. that do not apply here
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"model_args dtype = {dtype!r}: valid: {', '.join(DTYPES)}")
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cpu"  # lm-eval's default is cuda:0 even on machines without one
        self.model, self.tok = load_model_and_tokenizer(pretrained)
        self.model.to(device=device, dtype=DTYPES[dtype])
        self._device = torch.device(device)
        self.pretrained = str(pretrained)
        self.batch_size = (
            int(batch_size) if batch_size not in (None, "auto") and str(batch_size).isdigit() else 8
        )
        self.max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------ scoring
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args) for r in requests]
        results = loglikelihoods(self.model, self.tok, pairs, self.max_length, self.batch_size)
        for pair, res in zip(pairs, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", pair, res)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        texts = [r.args[0] for r in requests]
        results = [-nll for nll, _ in text_nll(self.model, self.tok, texts, self.max_length, self.batch_size)]
        for text, res in zip(texts, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), res)
        return results

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in tqdm(requests, disable=disable_tqdm, desc="quintet generate_until"):
            context, gen_kwargs = r.args
            text = self._generate_one(context, dict(gen_kwargs))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def _generate_one(self, context: str, kwargs: dict[str, Any]) -> str:
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        ids = self.tok.encode(context)[-(self.max_length - max_new) :] if context else [self._prefix()]
        config = GenerationConfig(
            max_new_tokens=max_new,
            do_sample=do_sample and temperature > 0,
            temperature=temperature if do_sample and temperature > 0 else 1.0,
            seed=int(kwargs.pop("seed", 0) or 0),
            vocab_limit=min(self.tok.vocab_size, self.model.config.vocab_size),
        )
        generated: list[int] = []
        text = ""
        for step in stream_generate(self.model, [ids], config):
            if step[0] is None:
                break
            generated.append(step[0])
            text = self.tok.decode(generated)
            if any(s and s in text for s in until):
                break
        return _cut(text, until)

    def _prefix(self) -> int:
        cfg = self.model.config
        return cfg.bos_token_id if cfg.bos_token_id is not None else cfg.eos_token_ids[0]

    # ------------------------------------------------------------------ chat
    @property
    def tokenizer_name(self) -> str:
        return f"quintet:{self.pretrained}"

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation as text: the model folder's chat template (as lm-eval's `hf` backend uses the
        tokenizer's), else quintet's plain template (`quintet.chat`)."""
        return chat_text(self.tok, chat_history, add_generation_prompt)


def _cut(text: str, until: Sequence[str]) -> str:
    """The text before the first stop string."""
    cuts = [text.index(s) for s in until if s and s in text]
    return text[: min(cuts)] if cuts else text


def main(argv: Sequence[str] | None = None) -> int:
    """lm-eval's command line with the `quintet` model registered (arguments as for `lm_eval`)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
