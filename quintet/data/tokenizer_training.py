"""Byte-level BPE tokenizer training (Hugging Face tokenizers) on curated documents.

The tokenizer is lossless: no normalisation, byte-level pre-tokenisation (GPT-2's regex) after splitting
digits one per token (as Jamba does, so numbers are spelled digit by digit), and a byte-level decoder, so
`decode(encode(text)) == text` for every string. Special tokens come first, with Jamba's default ids:

    0 <|pad|>   1 <|bos|>   2 <|eos|>   3 <|system|>   4 <|user|>   5 <|assistant|>

The chat template (quintet's chat format, `quintet.chat`) is stored in `tokenizer_config.json` as
`chat_template` (Jinja, as transformers reads it).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from quintet.chat import BOS, CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS
from quintet.io import atomic_path, atomic_write_text

log = logging.getLogger("quintet.data")


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with the digit split and the lossless decoder."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def curated_texts(curated: str | os.PathLike) -> Iterator[str]:
    """The `text` of every document in a curated folder (JSONL, optionally gzipped, or Parquet), sorted."""
    root = Path(curated)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{root}: no curated files (expected <lang>/<rank>.jsonl or .parquet)")
    for path in files:
        if path.name.endswith(".parquet"):
            import pyarrow.parquet as pq

            yield from pq.read_table(path, columns=["text"]).column("text").to_pylist()
        elif path.name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
            yield from (row["text"] for row in jsonl_rows(path))


def jsonl_rows(path: Path) -> Iterator[dict[str, Any]]:
    with contextlib.ExitStack() as stack:
        if path.name.endswith(".gz"):
            f: Any = stack.enter_context(gzip.open(path, "rt", encoding="utf-8"))
        elif path.name.endswith(".zst"):
            import zstandard

            raw = stack.enter_context(zstandard.ZstdDecompressor().stream_reader(path.open("rb")))
            f = io.TextIOWrapper(raw, encoding="utf-8")
        else:
            f = stack.enter_context(path.open(encoding="utf-8"))
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: malformed JSON ({err.msg})") from None


def train_tokenizer(
    texts: Iterable[str] | str | os.PathLike,
    out_dir: str | os.PathLike,
    vocab_size: int = 4096,
    min_frequency: int = 2,
    extra_special_tokens: list[str] | tuple[str, ...] = (),
    model_max_length: int = 4096,
) -> Path:
    """Train on `texts` (strings, or a curated folder) and save tokenizer.json + tokenizer_config.json.

    Returns the path of tokenizer.json. `vocab_size` counts the special tokens and the 256 bytes.
    """
    specials = [*SPECIAL_TOKENS, *extra_special_tokens]
    if len(set(specials)) != len(specials):
        raise ValueError(
            f"extra_special_tokens {list(extra_special_tokens)}: repeat a built-in special token"
        )
    minimum = len(specials) + 256
    if vocab_size < minimum:
        raise ValueError(f"vocab_size = {vocab_size}: must be >= {minimum} (special tokens + 256 bytes)")
    if isinstance(texts, (str, os.PathLike)):
        texts = curated_texts(texts)
    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    trained = tokenizer.get_vocab_size(with_added_tokens=True)
    if trained < vocab_size:
        log.warning(
            "warning: vocab_size = %d: the tokenizer has only %d tokens (the corpus has no pair of tokens "
            "left that occurs min_frequency = %d times)",
            vocab_size,
            trained,
            min_frequency,
        )
    for i, token in enumerate(specials):
        if tokenizer.token_to_id(token) != i:
            raise RuntimeError(f"special token {token} got id {tokenizer.token_to_id(token)}, expected {i}")
    return save_tokenizer(tokenizer, out_dir, specials, model_max_length)


def save_tokenizer(
    tokenizer: Tokenizer, out_dir: str | os.PathLike, specials: list[str], model_max_length: int = 4096
) -> Path:
    """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
    out = Path(out_dir)
    path = out / "tokenizer.json"
    with atomic_path(path) as tmp:
        tokenizer.save(str(tmp))
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(specials)
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": added,
    }
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": specials[3:],
    }
    atomic_write_text(out / "special_tokens_map.json", json.dumps(special_map, indent=2) + "\n")
    return path


def tokenizer_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a tokenizer.json: token shards record it, so they are never read with another one."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
