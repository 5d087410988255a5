"""The CAT-stage filter of Aurora-M: drop number- and symbol-heavy text (tables, logs, series of values).

Characters are classed by their Unicode category, whitespace ignored: letters and combining marks (L*, M*;
Hindi vowel signs are marks) are text, numbers (N*) are digits, punctuation and symbols (P*, S*) are
symbols. A document is dropped when digits exceed `max_digit_fraction` of its characters (`digit_heavy`), or
digits and symbols together exceed `max_non_letter_fraction` (`symbol_heavy`). Prose in our five languages
stays under 0.1 on both; a table of figures is over 0.5. Code is not checked.
"""

from __future__ import annotations

import regex
from datatrove.data import Document
from datatrove.pipeline.writers.disk_base import DiskWriter

from quintet.data.curation.base import CODE, CurationFilter

_DIGITS = regex.compile(r"\p{N}")
_SYMBOLS = regex.compile(r"[\p{P}\p{S}]")
_SPACE = regex.compile(r"\s")


def character_fractions(text: str) -> tuple[float, float]:
    """(digits, digits + punctuation + symbols) as fractions of the non-whitespace characters."""
    total = len(text) - len(_SPACE.findall(text))
    if total == 0:
        return 0.0, 0.0
    digits = len(_DIGITS.findall(text))
    return digits / total, (digits + len(_SYMBOLS.findall(text))) / total


class NumberHeavyFilter(CurationFilter):
    """Drops documents whose characters are mostly digits, punctuation and symbols."""

    def __init__(
        self,
        max_digit_fraction: float = 0.2,
        max_non_letter_fraction: float = 0.35,
        exclusion_writer: DiskWriter | None = None,
        name: str = "numbers",
    ):
        self.name = name
        super().__init__(exclusion_writer)
        for field, value in (
            ("max_digit_fraction", max_digit_fraction),
            ("max_non_letter_fraction", max_non_letter_fraction),
        ):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"numbers {field} = {value}: must be in (0, 1]")
        self.max_digit_fraction = max_digit_fraction
        self.max_non_letter_fraction = max_non_letter_fraction

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if (doc.metadata.get("language") or doc.metadata.get("declared_lang")) == CODE:
            return True
        digits, non_letters = character_fractions(doc.text)
        if digits > self.max_digit_fraction:
            return False, "digit_heavy"
        if non_letters > self.max_non_letter_fraction:
            return False, "symbol_heavy"
        return True
