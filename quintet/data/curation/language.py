"""Language identification with lingua (offline; datatrove's LanguageFilter downloads a fastText model).

The detector considers every language lingua knows (75), not only the targets: a German page must be
recognised as German, not as the closest of English/Finnish/Hindi/Japanese/Vietnamese. A document is kept
when its most likely language is a target and lingua's confidence in it reaches the threshold (one value,
or one per language). Code (`declared_lang == "code"`, set by the code reader or a row's `lang`) skips
detection and is kept as code (`code = false` in a config drops it, with `CodeFilter`).

Sets `metadata["language"]` (ISO 639-1) and `metadata["language_score"]`. Drop reasons: `other_language`
(with a `detected_<code>` count per language found) and `low_confidence`.

Speed: with `prefilter = true` (the default) a cheap test of the text's scripts and letters
(`scripts.candidate_languages`) first narrows the languages lingua compares, to those of the text's
script and, in Latin script, those whose accented letters it contains (plus every language with none,
and the targets); each candidate set gets its own lingua detector (the models are shared). Documents are
detected `batch_size` at a time with lingua's batch API, which spreads them over `threads` threads
(default 1: datatrove's workers are processes; more threads only where cores are free).
"""

from __future__ import annotations

import os
from typing import Any

from datatrove.data import Document
from datatrove.pipeline.writers.disk_base import DiskWriter

from quintet.data.curation.base import CODE, CurationFilter
from quintet.data.curation.scripts import candidate_languages

TARGET_LANGUAGES = ("en", "fi", "hi", "ja", "vi")


def lingua_language_codes() -> list[str]:
    """ISO 639-1 codes of every language lingua can detect."""
    from lingua import Language

    return sorted(lang.iso_code_639_1.name.lower() for lang in Language.all())


def _lingua_language(code: str) -> Any:
    from lingua import IsoCode639_1, Language

    return Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper()))


def validate_language_codes(codes: list[str], what: str = "languages") -> None:
    valid = lingua_language_codes()
    for code in codes:
        if code not in valid:
            raise ValueError(
                f"{what}: unknown language code {code!r}; valid ISO 639-1 codes: {', '.join(valid)}"
            )


class LanguageFilter(CurationFilter):
    """Keeps documents in the target languages (and code), with lingua's confidence >= threshold."""

    def __init__(
        self,
        languages: list[str] | tuple[str, ...] = TARGET_LANGUAGES,
        threshold: float | dict[str, float] = 0.5,
        candidates: list[str] | None = None,
        max_chars: int = 2000,
        accuracy: str = "high",
        prefilter: bool = True,
        batch_size: int = 64,
        threads: int = 1,
        exclusion_writer: DiskWriter | None = None,
        name: str = "language",
    ):
        self.name = name
        super().__init__(exclusion_writer)
        for field, value in (("batch_size", batch_size), ("threads", threads)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"language {field} = {value!r}: must be a positive integer")
        self.prefilter = bool(prefilter)
        self.batch_size = batch_size
        self.threads = threads
        validate_language_codes(list(languages))
        if candidates is not None:
            validate_language_codes(candidates, "candidates")
        self.languages = tuple(languages)
        thresholds = threshold if isinstance(threshold, dict) else dict.fromkeys(self.languages, threshold)
        for lang, value in thresholds.items():
            if lang not in self.languages:
                raise ValueError(f"threshold for {lang!r}: not one of the target languages {self.languages}")
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"threshold for {lang!r} = {value}: must be in [0, 1]")
        self.thresholds = {lang: float(thresholds.get(lang, 0.5)) for lang in self.languages}
        self.candidates = candidates
        if accuracy not in ("high", "low"):
            raise ValueError(f"language accuracy = {accuracy!r}: valid are 'high', 'low'")
        self.max_chars = max_chars
        self.accuracy = accuracy
        self._detectors: dict[frozenset[str] | None, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_detectors"] = {}  # rebuilt lazily in each worker
        return state

    @property
    def detector(self) -> Any:
        """lingua over every allowed language (`candidates` and the targets, or all 75)."""
        return self._detector_for(None)

    def _allowed(self) -> frozenset[str] | None:
        if self.candidates is None:
            return None
        return frozenset((*self.candidates, *self.languages))

    def candidates_for(self, text: str) -> frozenset[str] | None:
        """The languages lingua compares for `text`: the cheap test's, within the allowed ones."""
        allowed = self._allowed()
        if not self.prefilter:
            return allowed
        found = candidate_languages(text[: self.max_chars], self.languages)
        if found is None:
            return allowed
        narrowed = found if allowed is None else found & allowed
        return narrowed or allowed

    def _detector_for(self, langs: frozenset[str] | None) -> Any:
        if langs not in self._detectors:
            os.environ.setdefault("RAYON_NUM_THREADS", str(self.threads))  # lingua's batch thread pool
            from lingua import LanguageDetectorBuilder

            if langs is None and self._allowed() is None:
                builder = LanguageDetectorBuilder.from_all_languages()
            else:
                codes = langs if langs is not None else self._allowed()
                builder = LanguageDetectorBuilder.from_languages(*(_lingua_language(c) for c in codes))
            if self.accuracy == "low":
                builder = builder.with_low_accuracy_mode()
            self._detectors[langs] = builder.build()
        return self._detectors[langs]

    def detect(self, text: str) -> tuple[str, float]:
        """(ISO 639-1 code, confidence) of the most likely language; ("unknown", 0.0) if none."""
        return self.detect_many([text])[0]

    def detect_many(self, texts: list[str]) -> list[tuple[str, float]]:
        """`detect` for each text; texts with the same candidates go to lingua together."""
        groups: dict[frozenset[str] | None, list[int]] = {}
        for i, text in enumerate(texts):
            groups.setdefault(self.candidates_for(text), []).append(i)
        results: list[tuple[str, float]] = [("unknown", 0.0)] * len(texts)
        for langs, indices in groups.items():
            detector = self._detector_for(langs)
            cut = [texts[i][: self.max_chars] for i in indices]
            if len(cut) == 1 or self.threads == 1:
                all_values = [detector.compute_language_confidence_values(t) for t in cut]
            else:
                all_values = detector.compute_language_confidence_values_in_parallel(cut)
            for i, values in zip(indices, all_values, strict=True):
                if values and values[0].value > 0.0:
                    results[i] = (values[0].language.iso_code_639_1.name.lower(), float(values[0].value))
        return results

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        todo = [doc for doc in batch if doc.metadata.get("declared_lang") != CODE]
        for doc, result in zip(todo, self.detect_many([doc.text for doc in todo]), strict=True):
            doc.metadata["_detected"] = result
        return [self.filter(doc) for doc in batch]

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if doc.metadata.get("declared_lang") == CODE:
            doc.metadata["language"] = CODE
            return True
        lang, score = doc.metadata.pop("_detected", None) or self.detect(doc.text)
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = round(score, 4)
        if lang not in self.thresholds:
            self.stat_update(f"detected_{lang}")
            return False, "other_language"
        if score < self.thresholds[lang]:
            return False, "low_confidence"
        return True


class CodeFilter(CurationFilter):
    """Drops source code (`declared_lang == "code"`): what `code = false` in a config adds first."""

    def __init__(self, exclusion_writer: DiskWriter | None = None, name: str = "code"):
        self.name = name
        super().__init__(exclusion_writer)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return (False, "code") if doc.metadata.get("declared_lang") == CODE else True
