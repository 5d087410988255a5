"""Tokenizers: a model folder's trained `tokenizer.json` (Hugging Face tokenizers), or a byte-level fallback.

The byte-level tokenizer needs no training: ids 0, 1, 2 are pad, bos, eos (Jamba's defaults) and byte b is
id b + 3, so any model with a vocabulary of at least 259 can read and write any text.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer

from quintet.chat import compile_template, render_template
from quintet.errors import CheckpointError


def vocab_padding(vocab_size: int) -> int:
    """How many more embedding rows than tokenizer ids a model may have: padding, not another tokenizer.

    Models pad their vocabulary for fast matmuls (nanoGPT: GPT-2's 50257 tokens in 50304 rows, a multiple
    of 64; Megatron-LM to a multiple of 128 per tensor-parallel rank); a gap of 128 ids or 1% of the rows,
    whichever is larger, or more, means a tokenizer.json of another, smaller vocabulary.
    """
    return max(128, vocab_size // 100)


class TextTokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes shifted past the special ids: pad 0, bos 1, eos 2, byte b -> b + 3."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """UTF-8 bytes; there is no post-processor, so `add_special_tokens` adds nothing."""
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A trained `tokenizer.json`, read with the `tokenizers` library."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as err:  # the library raises a bare Exception on malformed files
            raise ValueError(f"{self.path}: not a readable tokenizer.json ({err})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config_path = self.path.parent / "tokenizer_config.json"
        try:
            self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{config_path}: not valid JSON ({err})") from None
        self.chat_template, self.chat_template_source = read_chat_template(self.path.parent, self.config)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """The ids of `text`; with `add_special_tokens` also the tokens the file's post-processor adds
        (a bos, say), as transformers' `tokenizer(text)` does."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    @property
    def eos_token(self) -> str | None:
        """The end-of-sequence token's text (tokenizer_config.json's `eos_token`), as transformers has it."""
        return _token_text(self.config.get("eos_token")) or None

    def token_text(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def render_chat_text(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """`messages` through the folder's chat template, as text (transformers' `apply_chat_template`
        with `tokenize=False`): the same sandboxed Jinja environment and variables."""
        if not self.chat_template:
            raise ValueError(
                f"{self.path.parent}: no chat template (neither chat_template.jinja nor a chat_template in "
                "tokenizer_config.json)"
            )
        special = {k: _token_text(self.config.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
        return render_template(
            self.chat_template, messages, add_generation_prompt, self.chat_template_source, **special
        )

    def render_chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of `messages` through the folder's chat template, ending where the answer starts."""
        return self.encode(self.render_chat_text(messages))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def _token_text(value: object) -> str:
    """A special token as tokenizer_config.json gives it: a string, or transformers' {"content": ...}."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return "" if value is None else str(value)


def read_chat_template(folder: str | os.PathLike, config: dict | None = None) -> tuple[str | None, str]:
    """A folder's chat template as transformers 5 reads it: `chat_template.jinja` if present, else the
    `chat_template` field of tokenizer_config.json; checked to compile. Returns (template or None, the
    file it came from)."""
    folder = Path(folder)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            template, source = jinja.read_text(encoding="utf-8"), str(jinja)
        except UnicodeDecodeError as err:
            raise ValueError(f"{jinja}: not UTF-8 text ({err})") from None
    else:
        template, source = (config or {}).get("chat_template"), str(folder / "tokenizer_config.json")
        if isinstance(template, list):  # transformers' named templates: the "default" one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
    if template:
        compile_template(template, source)
    return template or None, source


def load_tokenizer(model_dir: str | os.PathLike, vocab_size: int | None = None) -> TextTokenizer:
    """The folder's `tokenizer.json` if it has one, else the byte-level tokenizer.

    With `vocab_size` (the model's), checks that every id the tokenizer can produce fits the model (an
    error), and warns when a tokenizer.json is smaller than the model's vocabulary by more than padding
    (`vocab_padding`): a tokenizer of another, smaller vocabulary turns text into ids that stood for other
    text in training, and the answers into nonsense. Only a warning: sizes alone cannot tell it from a
    model trained from a preset with a smaller tokenizer (rows past the tokenizer unused).
    """
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        companions = [
            n for n in ("tokenizer_config.json", "chat_template.jinja") if (path.parent / n).is_file()
        ]
        if companions:  # a tokenizer's other files without its vocabulary: a copy went wrong
            raise ValueError(
                f"{path}: missing, while the folder has {', '.join(companions)}; copy the tokenizer's "
                "tokenizer.json too (or remove those files to use the byte-level tokenizer)"
            )
    tokenizer: TextTokenizer = HFTokenizer(path) if path.is_file() else ByteTokenizer()
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        source = path if path.is_file() else "the byte-level tokenizer"
        raise CheckpointError(
            f"{source}: {tokenizer.vocab_size} tokens do not fit the model's vocab_size = {vocab_size}"
        )
    if (
        vocab_size is not None
        and path.is_file()
        and vocab_size - tokenizer.vocab_size >= vocab_padding(vocab_size)
    ):
        logging.getLogger("quintet.tokenizer").warning(
            "warning: %s holds %d tokens, but the model's vocab_size is %d (config.json): more unused rows "
            "than padding (%d at most); unless the model was trained with this tokenizer (as `train lm` "
            "from a preset with a smaller one), it is another model's, and the output will be nonsense: "
            "copy the model's own tokenizer files into the folder",
            path,
            tokenizer.vocab_size,
            vocab_size,
            vocab_padding(vocab_size) - 1,
        )
    return tokenizer


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._emitted = 0
        self._bytes = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        if isinstance(self.tokenizer, ByteTokenizer):
            t = self.tokenizer
            return (
                self._bytes.decode(bytes([token_id - t.offset]))
                if t.offset <= token_id < t.vocab_size
                else ""
            )
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # wait for the rest of a multi-byte character
        piece, self._emitted = text[self._emitted :], len(text)
        return piece
