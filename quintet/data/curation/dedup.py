"""Exact and MinHash near-duplicate removal: datatrove's dedup stages, wired for a multilingual corpus.

Exact dedup (datatrove's 3 stages) hashes each document's full text; of identical texts, one is kept.
MinHash (datatrove's 4 stages) uses datatrove's defaults: word 5-gram shingles of the simplified text
(lower case, no punctuation, numbers and diacritics normalised), 14 buckets of 8 hashes, so documents with
Jaccard similarity s collide with probability 1 - (1 - s^8)^14: 0.5 at s = 0.72, 0.92 at 0.8, 0.9996 at
0.9 (`collision_probability`). Of each cluster of colliding documents one is kept.

Shingles need words. The corpus mixes languages in one dedup run, so the word tokenizer is chosen per
document by script (`ScriptAwareWordTokenizer`): Japanese and Chinese text goes through datatrove's
Japanese tokenizer (spaCy + SudachiPy), everything else is split on whitespace, which after datatrove's
simplification is what the language tokenizers produce for English, Finnish, Hindi and Vietnamese.

Stages (each a datatrove executor run, so each is resumable and can run on Slurm or Ray):

    exact_signatures -> exact_find -> minhash_signatures -> minhash_buckets -> minhash_clusters -> final

`final` reads the filtered documents once more, removes both kinds of duplicates and writes the output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import regex
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import (
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.dedup.exact_dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
)
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.utils.word_tokenizers import WordTokenizer, load_word_tokenizer

from quintet.data.curation.base import LanguageCounter

_CJK = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}]")


@dataclass
class DedupSettings:
    """Which dedup runs, and datatrove's MinHash parameters."""

    exact: bool = True
    minhash: bool = True
    n_grams: int = 5
    num_buckets: int = 14
    hashes_per_bucket: int = 8
    seed: int = 1

    def __post_init__(self) -> None:
        for name in ("n_grams", "num_buckets", "hashes_per_bucket"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"dedup {name} = {value!r}: must be a positive integer")
        if not (self.exact or self.minhash):
            raise ValueError("dedup: exact = false and minhash = false; remove the dedup step instead")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def minhash_config(self) -> MinhashConfig:
        return MinhashConfig(
            n_grams=self.n_grams,
            num_buckets=self.num_buckets,
            hashes_per_bucket=self.hashes_per_bucket,
            seed=self.seed,
        )


def collision_probability(similarity: float, num_buckets: int = 14, hashes_per_bucket: int = 8) -> float:
    """Probability that two documents of Jaccard `similarity` share at least one MinHash bucket."""
    return 1.0 - (1.0 - similarity**hashes_per_bucket) ** num_buckets


class ScriptAwareWordTokenizer(WordTokenizer):
    """MinHash words: Japanese and Chinese through datatrove's Japanese tokenizer, else split on spaces."""

    def __init__(self, cjk_fraction: float = 0.2):
        super().__init__("multilingual")
        self.cjk_fraction = cjk_fraction

    def _is_cjk(self, text: str) -> bool:
        return bool(text) and len(_CJK.findall(text)) / len(text) >= self.cjk_fraction

    def word_tokenize(self, text: str) -> list[str]:
        if self._is_cjk(text):
            return load_word_tokenizer("jpn_Jpan").word_tokenize(text)
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        if self._is_cjk(text):
            return load_word_tokenizer("jpn_Jpan").sent_tokenize(text)
        return [line for line in text.splitlines() if line.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for sentence in self.sent_tokenize(text):
            start = text.index(sentence, start)
            spans.append((start, start + len(sentence)))
            start += len(sentence)
        return spans


def renamed(step: PipelineStep, name: str) -> PipelineStep:
    """`step` under another name, in its statistics too (datatrove names them when the step is made)."""
    step.name = name
    step.stats.name = str(step)
    return step


def document_text(doc: Document) -> str:
    """What exact dedup hashes: the whole text."""
    return doc.text


@dataclass
class Stage:
    """One datatrove executor run: its steps and how many tasks it needs."""

    name: str
    pipeline: list[PipelineStep]
    tasks: int


def dedup_stages(
    reader: Callable[[], PipelineStep],
    work_dir: Path,
    settings: DedupSettings,
    tasks: int,
    writer: DiskWriter,
    exclusion_writer: Callable[[str], DiskWriter] | None = None,
) -> list[Stage]:
    """The stages that deduplicate what `reader()` yields and write the survivors with `writer`.

    `reader` makes a fresh reader of the filtered documents (each stage reads them again); every stage that
    reads them runs with the same `tasks`, so document indices line up across stages.
    """
    exact_cfg = ExactDedupConfig(content_getter=document_text)
    minhash_cfg = settings.minhash_config()
    exact_sigs, exact_dups = (str(work_dir / "exact" / d) for d in ("signatures", "duplicates"))
    minhash = work_dir / "minhash"
    mh_sigs, mh_buckets, mh_remove = (str(minhash / d) for d in ("signatures", "buckets", "remove"))

    def exclusions(name: str) -> DiskWriter | None:
        return exclusion_writer(name) if exclusion_writer else None

    def exact_filter(final: bool) -> list[PipelineStep]:
        if not settings.exact:
            return []
        excluded = exclusions("exact_dedup") if final else None
        return [
            renamed(ExactDedupFilter(exact_dups, config=exact_cfg, exclusion_writer=excluded), "exact_dedup")
        ]

    stages: list[Stage] = []
    if settings.exact:
        stages += [
            Stage("exact_signatures", [reader(), ExactDedupSignature(exact_sigs, config=exact_cfg)], tasks),
            Stage("exact_find", [ExactFindDedups(exact_sigs, exact_dups, config=exact_cfg)], 1),
        ]
    if settings.minhash:
        signature = MinhashDedupSignature(mh_sigs, config=minhash_cfg, language=ScriptAwareWordTokenizer())
        stages += [
            Stage("minhash_signatures", [reader(), *exact_filter(False), signature], tasks),
            Stage(
                "minhash_buckets",
                [MinhashDedupBuckets(mh_sigs, mh_buckets, config=minhash_cfg)],
                settings.num_buckets,
            ),
            Stage("minhash_clusters", [MinhashDedupCluster(mh_buckets, mh_remove, config=minhash_cfg)], 1),
        ]
    final: list[Any] = [reader(), LanguageCounter("dedup_input"), *exact_filter(True)]
    if settings.minhash:
        if settings.exact:
            final.append(LanguageCounter("exact_output"))
        minhash_filter = MinhashDedupFilter(mh_remove, exclusion_writer=exclusions("minhash_dedup"))
        final.append(renamed(minhash_filter, "minhash_dedup"))
    final += [LanguageCounter("dedup_output", tag=True), writer]
    stages.append(Stage("final", final, tasks))
    return stages
