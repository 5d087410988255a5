"""Imported once by the forkserver that datatrove's local executor forks its workers from.

Every stage of a curation run with `workers > 1` starts a new pool of worker processes; each used to
import spaCy, pyvi, Sudachi and lingua and build the word tokenizers again (3-5 s per worker per stage on
our machines). Named in `multiprocess`'s forkserver preload list (`pipeline.make_executors`), this module
does that work once per run in the forkserver, and every worker forked from it inherits the imported
modules and the built tokenizers (datatrove's `load_word_tokenizer` cache).

It also ties the forkserver and every worker forked from it to the run's process (`quintet.processes`):
when `quintet data curate` is killed, even with SIGKILL, they are killed too.
"""

from __future__ import annotations

import contextlib
import os

from quintet.processes import children_die_with_this_process, die_with_parent

die_with_parent(os.getppid())  # the forkserver dies with the run that started it
children_die_with_this_process()  # and each worker it forks dies with the forkserver

import datatrove.pipeline.dedup  # noqa: F401, E402
import datatrove.pipeline.filters  # noqa: F401, E402
import datatrove.pipeline.readers  # noqa: F401, E402
import datatrove.pipeline.writers  # noqa: F401, E402
import lingua  # noqa: F401, E402
from datatrove.utils.word_tokenizers import load_word_tokenizer  # noqa: E402

import quintet.data.curation  # noqa: F401, E402
from quintet.data.curation.quality import WORD_TOKENIZER  # noqa: E402


def build_word_tokenizers() -> None:
    """datatrove's tokenizers of the default languages, built (a missing optional one is skipped)."""
    for code in WORD_TOKENIZER.values():
        with contextlib.suppress(Exception):
            tok = load_word_tokenizer(code)
            tok.word_tokenize("warm up")


build_word_tokenizers()
