"""Toxicity filter on per-language word lists (the project's small lists, or a user's own files).

A list is a UTF-8 text file: one term or phrase per line, `#` starts a comment. Terms are matched as whole
words (letters, combining marks and digits on either side end a match; spaces inside a phrase match any
whitespace), case-insensitively, after Unicode NFC normalisation of both text and terms (Hindi nukta forms
and Vietnamese tone marks have several encodings). Japanese and Chinese have no spaces between words, so
their terms are matched as substrings.

A document with at least `min_matches` matches is dropped (reason `toxic_terms`); its matches are recorded
in `metadata["toxic_terms"]` so a person reading the dropped documents can see why. Code is not checked.
"""

from __future__ import annotations

import os
import unicodedata
from importlib import resources
from pathlib import Path

import regex
from datatrove.data import Document
from datatrove.pipeline.writers.disk_base import DiskWriter

from quintet.data.curation.base import CODE, CurationFilter
from quintet.data.curation.language import TARGET_LANGUAGES

SUBSTRING_LANGUAGES = ("ja", "zh")
_WORD = r"[\p{L}\p{M}\p{N}_]"


def read_terms(path: str | os.PathLike) -> list[str]:
    """The terms of a word-list file (comments and blank lines dropped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"toxicity list {path}: no such file") from None
    except UnicodeDecodeError as err:
        line = path.read_bytes().count(b"\n", 0, err.start) + 1
        raise ValueError(f"toxicity list {path}:{line}: not UTF-8 text") from None
    return [t.strip() for t in text.splitlines() if t.strip() and not t.lstrip().startswith("#")]


def builtin_terms(lang: str) -> list[str]:
    """The project's list for `lang` (en, fi, hi, ja, vi)."""
    resource = resources.files("quintet.data").joinpath("resources", "toxicity", f"{lang}.txt")
    if not resource.is_file():
        raise ValueError(
            f"toxicity: no built-in word list for {lang!r} (built-in: {', '.join(TARGET_LANGUAGES)}); "
            "give one with lists = {" + lang + ' = "path/to/list.txt"}'
        )
    with resources.as_file(resource) as path:
        return read_terms(path)


def compile_terms(terms: list[str], substring: bool = False) -> regex.Pattern:
    """One pattern matching any of `terms` (longest first), as whole words unless `substring`."""
    normalised = sorted({unicodedata.normalize("NFC", t.casefold()) for t in terms}, key=len, reverse=True)
    if not normalised:
        raise ValueError("toxicity: an empty word list")
    alternatives = "|".join(r"\s+".join(regex.escape(w) for w in t.split()) for t in normalised)
    if substring:
        return regex.compile(f"(?:{alternatives})")
    return regex.compile(f"(?<!{_WORD})(?:{alternatives})(?!{_WORD})")


def find_terms(pattern: regex.Pattern, text: str) -> list[str]:
    """Every match of `pattern` in `text` (after the same normalisation as the terms)."""
    return pattern.findall(unicodedata.normalize("NFC", text.casefold()))


class ToxicityFilter(CurationFilter):
    """Drops documents containing at least `min_matches` terms of their language's list."""

    def __init__(
        self,
        languages: list[str] | tuple[str, ...] = TARGET_LANGUAGES,
        lists: dict[str, str] | None = None,
        min_matches: int = 1,
        exclusion_writer: DiskWriter | None = None,
        name: str = "toxicity",
    ):
        self.name = name
        super().__init__(exclusion_writer)
        if min_matches < 1:
            raise ValueError(f"toxicity min_matches = {min_matches}: must be >= 1")
        lists = lists or {}
        for lang in lists:
            if lang not in languages:
                raise ValueError(f"toxicity lists: {lang!r} is not one of the languages {tuple(languages)}")
        self.min_matches = min_matches
        self.terms = {
            lang: read_terms(lists[lang]) if lang in lists else builtin_terms(lang) for lang in languages
        }
        self._patterns: dict[str, regex.Pattern] | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_patterns"] = None
        return state

    def pattern(self, lang: str) -> regex.Pattern | None:
        if self._patterns is None:
            self._patterns = {
                lang: compile_terms(terms, substring=lang in SUBSTRING_LANGUAGES)
                for lang, terms in self.terms.items()
            }
        return self._patterns.get(lang)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        lang = doc.metadata.get("language") or doc.metadata.get("declared_lang")
        if lang == CODE:
            return True
        pattern = self.pattern(lang)
        if pattern is None:
            return True
        matches = find_terms(pattern, doc.text)
        if len(matches) >= self.min_matches:
            doc.metadata["toxic_terms"] = sorted(set(matches))
            return False, "toxic_terms"
        return True
