"""Quality heuristics: datatrove's Gopher (quality, repetition), C4 and FineWeb filters, per language.

One step holds, for each target language, the datatrove filters configured with that language's word
tokenizer (`hin_Deva` for Hindi, ...) and thresholds, and applies them in FineWeb's order: Gopher repetition,
Gopher quality, C4, FineWeb. A document is dropped by the first that rejects it; the reason is
`<filter>:<datatrove's reason>`, e.g. `gopher_quality:gopher_short_doc`. Note that datatrove's C4 filter also
edits the text it keeps (lines without terminal punctuation, with fewer than 3 words, or about cookies and
JavaScript are removed), as in C4.

The thresholds are datatrove's defaults except where a language needs its own (`LANGUAGE_DEFAULTS`):
- Gopher's stop-word test uses each language's own stop words (datatrove's list is English);
- Japanese words from the Sudachi tokenizer average under 3 characters, so Gopher's minimum mean word
  length is 1 there; C4's "at least 3 words per line" is meaningless without spaces, so it is off;
- C4's terminal punctuation is `. ? ! " '`: Hindi ends sentences with the danda (।) and Japanese with 。,
  so C4's per-line punctuation test is off for both (FineWeb's, which knows both marks, stays on).

Source code (`language == "code"`) gets StarCoder-style checks instead: longest line, mean line length,
fraction of alphanumeric characters.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

from datatrove.data import Document
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.filters.base_filter import BaseFilter, get_filter_result
from datatrove.pipeline.writers.disk_base import DiskWriter

from quintet.data.curation.base import CODE, CurationFilter
from quintet.data.curation.heuristics import FASTER
from quintet.data.curation.language import TARGET_LANGUAGES
from quintet.data.curation.words import SharedWords

# datatrove's filters, in the order they run.
FILTERS: dict[str, type[BaseFilter]] = {
    "gopher_repetition": GopherRepetitionFilter,
    "gopher_quality": GopherQualityFilter,
    "c4": C4QualityFilter,
    "fineweb": FineWebQualityFilter,
}

# datatrove's word tokenizer for each language (see datatrove/assets/tokenizer_assignment.csv).
WORD_TOKENIZER = {"en": "eng_Latn", "fi": "fin_Latn", "hi": "hin_Deva", "ja": "jpn_Jpan", "vi": "vie_Latn"}

STOP_WORDS = {
    "en": ["the", "be", "to", "of", "and", "that", "have", "with"],  # datatrove's (Gopher's) list
    "fi": ["ja", "on", "ei", "se", "että", "oli", "kun", "mutta", "joka", "niin", "myös", "ovat"],
    "hi": ["के", "है", "में", "की", "और", "से", "को", "का", "कि", "पर", "एक", "यह"],
    "ja": ["の", "に", "は", "を", "た", "が", "で", "て", "と", "し", "も", "な"],
    "vi": ["và", "của", "là", "có", "được", "trong", "những", "các", "một", "cho", "không", "với"],
}

LANGUAGE_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "en": {},
    "fi": {},
    "hi": {"c4": {"filter_no_terminal_punct": False}},
    "ja": {
        "gopher_quality": {"min_avg_word_length": 1},
        "c4": {"filter_no_terminal_punct": False, "min_words_per_line": -1},
    },
    "vi": {},
}

CODE_DEFAULTS = {"max_line_length": 1000, "max_mean_line_length": 100.0, "min_alnum_fraction": 0.25}


def filter_parameters(key: str) -> list[str]:
    """The threshold names a datatrove filter accepts (what may appear under `[steps.<lang>.<key>]`)."""
    params = inspect.signature(FILTERS[key].__init__).parameters
    return [p for p in params if p not in ("self", "exclusion_writer", "language")]


def language_settings(
    lang: str, overrides: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """The keyword arguments of each datatrove filter for `lang`: defaults, then `overrides`."""
    settings: dict[str, dict[str, Any]] = {key: {} for key in FILTERS}
    settings["gopher_quality"]["stop_words"] = STOP_WORDS.get(lang)
    for source in (LANGUAGE_DEFAULTS.get(lang, {}), overrides or {}):
        for key, values in source.items():
            if key not in FILTERS:
                raise ValueError(
                    f"quality thresholds for {lang!r}: unknown filter {key!r}; valid: {', '.join(FILTERS)}"
                )
            valid = filter_parameters(key)
            for name in values:
                if name not in valid:
                    raise ValueError(
                        f"quality thresholds for {lang!r}, {key}: unknown setting {name!r}; "
                        f"valid: {', '.join(valid)}"
                    )
            settings[key].update(copy.deepcopy(values))
    return settings


def datatrove_filters(
    lang: str,
    settings: dict[str, dict[str, Any]],
    keys: tuple[str, ...] = tuple(FILTERS),
    words: SharedWords | None = None,
) -> list[tuple[str, BaseFilter]]:
    """datatrove's filters for `lang` in FineWeb's order; with `words`, quintet's faster equivalents of them
    (`heuristics.py`), all tokenizing through `words`.

    Without `words` each filter gets the language code and tokenizes every document itself (datatrove as
    it ships: what `words` must agree with, decision for decision).
    """
    if words is None:
        code = WORD_TOKENIZER.get(lang, lang)
        return [(key, FILTERS[key](language=code, **settings[key])) for key in FILTERS if key in keys]
    return [(key, FASTER[FILTERS[key]](language=words, **settings[key])) for key in FILTERS if key in keys]


def code_quality(
    text: str,
    max_line_length: int = 1000,
    max_mean_line_length: float = 100.0,
    min_alnum_fraction: float = 0.25,
) -> bool | tuple[bool, str]:
    """StarCoder-style checks for source files: no minified or generated blobs."""
    lines = text.splitlines() or [""]
    if max(len(line) for line in lines) > max_line_length:
        return False, "code_long_line"
    if sum(len(line) for line in lines) / len(lines) > max_mean_line_length:
        return False, "code_mean_line_length"
    if sum(c.isalnum() for c in text) / max(len(text), 1) < min_alnum_fraction:
        return False, "code_low_alnum"
    return True


class QualityFilter(CurationFilter):
    """datatrove's Gopher, C4 and FineWeb heuristics with per-language word tokenizers and thresholds."""

    def __init__(
        self,
        languages: list[str] | tuple[str, ...] = TARGET_LANGUAGES,
        filters: list[str] | tuple[str, ...] = tuple(FILTERS),
        thresholds: dict[str, dict[str, dict[str, Any]]] | None = None,
        code: dict[str, Any] | None = None,
        shared_words: bool = True,
        exclusion_writer: DiskWriter | None = None,
        name: str = "quality",
    ):
        self.name = name
        super().__init__(exclusion_writer)
        for key in filters:
            if key not in FILTERS:
                raise ValueError(f"quality filters: unknown filter {key!r}; valid: {', '.join(FILTERS)}")
        thresholds = thresholds or {}
        for lang in thresholds:
            if lang not in languages:
                raise ValueError(
                    f"quality thresholds for {lang!r}: not one of the languages {tuple(languages)}"
                )
        unknown = set(code or {}) - set(CODE_DEFAULTS)
        if unknown:
            raise ValueError(
                f"quality code settings: unknown {sorted(unknown)}; valid: {', '.join(CODE_DEFAULTS)}"
            )
        self.languages = tuple(languages)
        self.filters = tuple(k for k in FILTERS if k in filters)  # always in FineWeb's order
        self.settings = {lang: language_settings(lang, thresholds.get(lang)) for lang in self.languages}
        self.code = {**CODE_DEFAULTS, **(code or {})}
        self.shared_words = bool(shared_words)
        self.words = {
            lang: SharedWords(WORD_TOKENIZER.get(lang, lang)) if self.shared_words else None
            for lang in self.languages
        }
        self._by_language: dict[str, list[tuple[str, BaseFilter]]] = {
            lang: datatrove_filters(lang, self.settings[lang], self.filters, self.words[lang])
            for lang in self.languages
        }

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        lang = doc.metadata.get("language") or doc.metadata.get("declared_lang")
        if lang == CODE:
            return code_quality(doc.text, **self.code)
        if lang not in self._by_language:
            return False, "no_thresholds_for_language"
        for key, datatrove_filter in self._by_language[lang]:
            keep, reason = get_filter_result(datatrove_filter.filter(doc))
            if not keep:
                return False, f"{key}:{reason or 'rejected'}"
        return True
