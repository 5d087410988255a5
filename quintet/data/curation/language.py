"""Language identification with lingua (offline; datatrove's LanguageFilter downloads a fastText model).

The detector considers every language lingua knows (75), not only the targets: a German page must be
recognised as German, not as the closest of English/Finnish/Hindi/Japanese/Vietnamese. A document is kept
when its most likely language is a target and lingua's confidence in it reaches the threshold (one value,
or one per language). Code (`declared_lang == "code"`, set by the code reader or a row's `lang`) skips
detection and is kept as code (`code = false` in a config drops it, with `CodeFilter`).

Sets `metadata["language"]` (ISO 639-1) and `metadata["language_score"]`. Drop reasons: `other_language`
(with a `detected_<code>` count per language found) and `low_confidence`.
"""

from __future__ import annotations

from typing import Any

from datatrove.data import Document
from datatrove.pipeline.writers.disk_base import DiskWriter

from quintet.data.curation.base import CODE, CurationFilter

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
        exclusion_writer: DiskWriter | None = None,
        name: str = "language",
    ):
        self.name = name
        super().__init__(exclusion_writer)
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
        self._detector = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_detector"] = None  # rebuilt lazily in each worker
        return state

    @property
    def detector(self) -> Any:
        if self._detector is None:
            from lingua import LanguageDetectorBuilder

            if self.candidates is None:
                builder = LanguageDetectorBuilder.from_all_languages()
            else:
                langs = {_lingua_language(c) for c in (*self.candidates, *self.languages)}
                builder = LanguageDetectorBuilder.from_languages(*langs)
            if self.accuracy == "low":
                builder = builder.with_low_accuracy_mode()
            self._detector = builder.build()
        return self._detector

    def detect(self, text: str) -> tuple[str, float]:
        """(ISO 639-1 code, confidence) of the most likely language; ("unknown", 0.0) if none."""
        values = self.detector.compute_language_confidence_values(text[: self.max_chars])
        if not values or values[0].value <= 0.0:
            return "unknown", 0.0
        return values[0].language.iso_code_639_1.name.lower(), float(values[0].value)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if doc.metadata.get("declared_lang") == CODE:
            doc.metadata["language"] = CODE
            return True
        lang, score = self.detect(doc.text)
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
