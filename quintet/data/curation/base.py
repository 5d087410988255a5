"""What every quintet curation step shares: the document's language, and drop counts per language.

datatrove's `BaseFilter` counts `total`, `forwarded`, `dropped` and `dropped_<reason>` per step. Ours add
the same counters per language, named `<lang>/total`, `<lang>/forwarded`, `<lang>/dropped` and
`<lang>/dropped_<reason>`, so the statistics can be broken down by language (`stats.py` reads them back),
and `input_bytes` (UTF-8 bytes of text entering the step), for throughput in MB/s.
"""

from __future__ import annotations

import contextlib
import os
import time

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter, get_filter_result
from datatrove.utils.batching import batched
from datatrove.utils.typeshelper import StatHints

CODE = "code"  # the language label of source code
UNKNOWN = "unknown"


def document_language(doc: Document) -> str:
    """The language a step should treat `doc` as: the detected one, else the one its source declared."""
    meta = doc.metadata
    return meta.get("language") or meta.get("declared_lang") or UNKNOWN


class CurationFilter(BaseFilter):
    """A datatrove filter whose drops are also counted per language."""

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """As datatrove's `BaseFilter.run`, counting per language too; `filter_batch` when batch_size > 1."""
        with self.exclusion_writer if self.exclusion_writer else contextlib.nullcontext() as writer:
            for batch in batched(data, self.batch_size):
                for doc in batch:
                    self.stat_update("input_bytes", value=len(doc.text.encode("utf-8")))
                with self.track_time():
                    results = [self.filter(batch[0])] if len(batch) == 1 else self.filter_batch(batch)
                for doc, result in zip(batch, results, strict=True):
                    keep, reason = get_filter_result(result)
                    lang = document_language(doc)  # after filter(): the language step sets it
                    self.stat_update(StatHints.total, f"{lang}/{StatHints.total}")
                    if keep:
                        self.stat_update(StatHints.forwarded, f"{lang}/{StatHints.forwarded}")
                        yield doc
                        continue
                    reason = reason or "unspecified"
                    self.stat_update(
                        StatHints.dropped,
                        f"{lang}/{StatHints.dropped}",
                        f"dropped_{reason}",
                        f"{lang}/dropped_{reason}",
                    )
                    if writer:
                        doc.metadata["filter_reason"] = f"{self.name}:{reason}"
                        writer.write(doc, rank)


class LanguageCounter(PipelineStep):
    """Counts documents per language as they pass (used around datatrove's dedup stages).

    With `tag=True` it also sets `metadata["language"]` where no step has, so output files can be split by it.
    """

    type = "📊 - STATS"

    def __init__(self, name: str, tag: bool = False):
        self.name = name  # before PipelineStep.__init__, which names the step's stats after it
        super().__init__()
        self.tag = tag

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            lang = document_language(doc)
            if self.tag:
                doc.metadata.setdefault("language", lang)
            self.stat_update(StatHints.total, f"{lang}/{StatHints.total}")
            self.stat_update("input_bytes", value=len(doc.text.encode("utf-8")))
            yield doc


class DocumentProgress(PipelineStep):
    """Counts documents as they pass and writes each task's count to `<folder>/<rank>` about once a second
    (atomically), so the command can show a progress bar of a long stage. No statistics of its own."""

    type = "⏳ - PROGRESS"
    name = "progress"

    def __init__(self, folder: str, every_s: float = 1.0):
        super().__init__()
        self.folder, self.every_s = folder, every_s

    def _write(self, rank: int, count: int) -> None:
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"{rank:05d}")
        with open(path + ".tmp", "w") as f:
            f.write(str(count))
        os.replace(path + ".tmp", path)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        count, last = 0, time.monotonic()
        for doc in data:
            count += 1
            if count % 64 == 0 and time.monotonic() - last >= self.every_s:
                self._write(rank, count)
                last = time.monotonic()
            yield doc
        self._write(rank, count)
