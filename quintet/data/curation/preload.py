"""Imported once by the forkserver that datatrove's local executor forks its workers from.

Every stage of a curation run with `workers > 1` starts a new pool of worker processes; each used to
import spaCy, pyvi, Sudachi and lingua and build the word tokenizers again (3-5 s per worker per stage on
our machines). Named in `multiprocess`'s forkserver preload list (`pipeline.make_executors`), this module
does that work once per run in the forkserver, and every worker forked from it inherits the imported
modules and the built tokenizers (datatrove's `load_word_tokenizer` cache).

`quintet.die_with_parent`, preloaded before it, ties the forkserver and its workers to the run's process.
"""

from __future__ import annotations

import contextlib

import datatrove.pipeline.dedup  # noqa: F401
import datatrove.pipeline.filters  # noqa: F401
import datatrove.pipeline.readers  # noqa: F401
import datatrove.pipeline.writers  # noqa: F401
import lingua  # noqa: F401
from datatrove.utils.word_tokenizers import load_word_tokenizer

import quintet.data.curation  # noqa: F401
from quintet.data.curation.quality import WORD_TOKENIZER


def build_word_tokenizers() -> None:
    """datatrove's tokenizers of the default languages, built (a missing optional one is skipped)."""
    for code in WORD_TOKENIZER.values():
        with contextlib.suppress(Exception):
            tok = load_word_tokenizer(code)
            tok.word_tokenize("warm up")


build_word_tokenizers()
