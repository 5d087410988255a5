"""datatrove's four quality filters, deciding exactly as they do, with their computations done faster.

Each class is datatrove's filter (same constructor, same thresholds, same rules in the same order, same
reasons, and C4's same edited text); only `filter` is rewritten. `tests/test_data_quality_exact.py` runs
them against datatrove's own filters document by document. What changes:

- Gopher repetition: every n-gram's text gets a hash from prefix sums over the joined words (numpy,
  `GramHashes`); where all hashes differ, the n-grams differ, so the top n-gram occurs once and no
  n-gram repeats, without building the n-gram strings. Where hashes are equal, the strings are built
  (each from the (n-1)-gram's, `NGrams`) and counted or scanned as datatrove does; the top n-gram's
  group is checked on its strings, so a hash collision can only send a document to the exact count.
- Gopher quality: one list comprehension per rule, and whether a word has a letter is remembered per word
  (words repeat across documents); `str.strip(punctuation)` is empty exactly when every character of the
  word is punctuation.
- C4: every kept line has at least one sentence (datatrove's `split_into_sentences` never returns an
  empty list), so lines are split into sentences only while the kept lines are fewer than
  `min_num_sentences`, and only until the count reaches it: the decision needs no more. A line without
  `[` has no citation to remove; the policy phrases are one regular expression.
- FineWeb: its list test (`newlines / words > new_line_ratio`) asks the word tokenizer for a lower bound
  on the word count first (`SharedWords.min_word_count`); when the bound already keeps the document, the
  words of C4's edited text are not computed.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from operator import add
from typing import Any

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.filters.c4_filters import (
    CITATION_REGEX,
    ELLIPSIS,
    END_PUNCTUATION,
    POLICY_SUBSTRINGS,
)
from datatrove.pipeline.filters.gopher_repetition_filter import (
    find_all_duplicate,
    find_duplicates,
    get_n_grams,
)
from datatrove.utils.text import PUNCTUATION_SET, split_into_sentences, split_into_words

_PUNCTUATION = "".join(sorted(c for c in PUNCTUATION_SET if len(c) == 1))
_POLICY = re.compile("|".join(map(re.escape, POLICY_SUBSTRINGS)))
_MAX_WORD_CACHE = 500_000


class GopherRepetition(GopherRepetitionFilter):
    """datatrove's Gopher repetition filter: paragraphs, lines, top 2-4-grams, duplicated 5-10-grams."""

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text = doc.text
        if not text:
            return False, "empty"
        paragraphs = self.paragraph_exp.split(text.strip())
        duplicates, chars = find_duplicates(paragraphs)
        if self.dup_para_frac and duplicates / len(paragraphs) > self.dup_para_frac:
            return False, "dup_para_frac"
        if self.dup_para_char_frac and chars / len(text) > self.dup_para_char_frac:
            return False, "dup_para_char_frac"
        lines = self._line_splitter.split(text)
        duplicates, chars = find_duplicates(lines)
        if self.dup_line_frac and duplicates / len(lines) > self.dup_line_frac:
            return False, "dup_line_frac"
        if self.dup_line_char_frac and chars / len(text) > self.dup_line_char_frac:
            return False, "dup_line_char_frac"
        words = split_into_words(text, self.language)
        spaced, spaced_hashes = NGrams(words, " "), GramHashes(words, " ")
        for n, frac in self.top_n_grams:
            if n > len(words):
                continue  # no n-grams
            top = spaced_hashes.top_chars(n) if n >= 1 else None
            if top is None:  # two different n-grams with one hash: count the strings
                top = _top_duplicate_chars(spaced.of(n) if n >= 1 else get_n_grams(words, n))
            if top / len(text) > frac:
                return False, f"top_{n}_gram"
        joined, joined_hashes = NGrams(words, ""), GramHashes(words, "")
        for n, frac in self.dup_n_grams:
            if n < 1:
                repeated = find_all_duplicate(words, n)
            elif n > len(words) or not joined_hashes.may_repeat(n):
                repeated = 0  # no n-gram occurs twice
            else:
                repeated = _repeated_chars(joined.of(n), n)
            if repeated / len(text) > frac:
                return False, f"duplicated_{n}_n_grams"
        return True


class GramHashes:
    """A hash of the text of every n-gram (`sep.join(words[i:i + n])`), for any n, in numpy.

    The hash of text[a:b] is sum(code[t] * INV**(t - a)) mod 2**64, from prefix sums, so equal texts
    have equal hashes wherever they are. Distinct hashes prove n-grams distinct; equal hashes are
    checked on the strings (or left to the exact count), so the results stay exact.
    """

    def __init__(self, words: list[str], sep: str):
        self.text = sep.join(words)
        self.sep = len(sep)
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words)) + self.sep
        self.starts = np.zeros(len(words) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.starts[1:])
        codes = np.frombuffer(self.text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        inverse, power = _hash_powers(len(self.text) + 1)
        self.prefix = np.zeros(len(self.text) + 1, dtype=np.uint64)
        np.cumsum(codes * inverse[: len(codes)], out=self.prefix[1:])
        self.power = power

    def of(self, n: int) -> np.ndarray:
        """The hash of each n-gram, in order (n <= number of words)."""
        a, b = self.starts[: len(self.starts) - n], self.starts[n:] - self.sep
        return (self.prefix[b] - self.prefix[a]) * self.power[a]

    def gram(self, i: int, n: int) -> str:
        return self.text[self.starts[i] : self.starts[i + n] - self.sep]

    def may_repeat(self, n: int) -> bool:
        """False when no two n-grams are equal (their hashes all differ)."""
        keys = np.sort(self.of(n))
        return bool((keys[1:] == keys[:-1]).any())

    def top_chars(self, n: int) -> int | None:
        """datatrove's `find_top_duplicate`: characters of the most frequent n-gram (first of equals) times
        its count; None when an n-gram of that count shares its hash with a different one."""
        keys = self.of(n)
        order = np.argsort(keys, kind="stable")  # within a group, n-grams stay in text order
        ordered = keys[order]
        starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
        counts = np.diff(np.append(starts, len(ordered)))
        count = int(counts.max())
        if count == 1:  # all distinct: the first n-gram, once
            return len(self.gram(0, n))
        first = None
        for group in np.flatnonzero(counts == count):
            members = order[starts[group] : starts[group] + count]
            if len({self.gram(int(i), n) for i in members}) != 1:
                return None
            first = int(members[0]) if first is None else min(first, int(members[0]))
        return len(self.gram(first, n)) * count


_HASH_BASE = 0x9E3779B97F4A7C15  # odd, so invertible mod 2**64
_hash_tables: list[np.ndarray] = []


def _hash_powers(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(INV**k, BASE**k) mod 2**64 for k < size (at least), grown by doubling and kept."""
    if not _hash_tables or len(_hash_tables[0]) < size:
        size = max(size, 2 * len(_hash_tables[0]) if _hash_tables else 4096)
        tables = []
        for base in (pow(_HASH_BASE, -1, 2**64), _HASH_BASE):
            steps = np.full(size, base, dtype=np.uint64)
            steps[0] = 1
            tables.append(np.cumprod(steps, dtype=np.uint64))
        _hash_tables[:] = tables
    return _hash_tables[0], _hash_tables[1]


class NGrams:
    """`sep.join(words[i:i + n])` for every i, for growing n, each list built from the one before."""

    def __init__(self, words: list[str], sep: str):
        self.words = words
        self.tails = [sep + w for w in words] if sep else words
        self.n, self.grams = 1, list(words)

    def of(self, n: int) -> list[str]:
        if n < self.n:  # thresholds given out of order: start again
            self.n, self.grams = 1, list(self.words)
        while self.n < n and self.grams:
            self.grams = list(map(add, self.grams[:-1], self.tails[self.n :]))
            self.n += 1
        return self.grams


def _top_duplicate_chars(grams: list[str]) -> int:
    """Characters of the most frequent n-gram times its count (the first of equals, as Counter picks)."""
    gram, count = Counter(grams).most_common(1)[0]
    return len(gram) * count


def _repeated_chars(grams: list[str], n: int) -> int:
    """datatrove's `find_all_duplicate`: scan left to right; a repeat counts its characters, skips n."""
    if len(set(grams)) == len(grams):
        return 0
    seen: set[str] = set()
    repeated, i = 0, 0
    while i < len(grams):
        gram = grams[i]
        if gram in seen:
            repeated += len(gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return repeated


class _HasLetter(dict):
    """word -> whether it has an alphabetic character (datatrove's `any(c.isalpha() for c in w)`)."""

    def __missing__(self, word: str) -> bool:
        if len(self) > _MAX_WORD_CACHE:
            self.clear()
        value = self[word] = any(c.isalpha() for c in word)
        return value


class GopherQuality(GopherQualityFilter):
    """datatrove's Gopher quality filter: word counts and lengths, symbols, bullets, letters, stop words."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._has_letter = _HasLetter()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_has_letter": _HasLetter()}

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text = doc.text
        words = split_into_words(text, self.language)
        lines = text.splitlines()
        n_words = len(words)
        if not n_words or not lines:  # datatrove divides by zero there; let it
            return super().filter(doc)
        non_symbol_words = [w for w in words if w.strip(_PUNCTUATION)]
        n_non_symbol = len(non_symbol_words)
        if self.min_doc_words and n_non_symbol < self.min_doc_words:
            return False, "gopher_short_doc"
        if self.max_doc_words and n_non_symbol > self.max_doc_words:
            return False, "gopher_long_doc"
        # np.mean of the lengths: their float sum is exact, then one division, as here
        mean_length = sum(map(len, non_symbol_words)) / n_non_symbol if n_non_symbol else math.nan
        if self.min_avg_word_length and mean_length < self.min_avg_word_length:
            return False, "gopher_below_avg_threshold"
        if self.max_avg_word_length and mean_length > self.max_avg_word_length:
            return False, "gopher_above_avg_threshold"
        if self.max_symbol_word_ratio and text.count("#") / n_words > self.max_symbol_word_ratio:
            return False, "gopher_too_many_hashes"
        if (
            self.max_symbol_word_ratio
            and (text.count("...") + text.count("…")) / n_words > self.max_symbol_word_ratio
        ):
            return False, "gopher_too_many_ellipsis"
        if (
            self.max_bullet_lines_ratio
            and len([s for s in lines if s.lstrip().startswith(("•", "-"))]) / len(lines)
            > self.max_bullet_lines_ratio
        ):
            return False, "gopher_too_many_bullets"
        if (
            self.max_ellipsis_lines_ratio
            and len([s for s in lines if s.rstrip().endswith(("...", "…"))]) / len(lines)
            > self.max_ellipsis_lines_ratio
        ):
            return False, "gopher_too_many_end_ellipsis"
        if (
            self.max_non_alpha_words_ratio
            and sum(map(self._has_letter.__getitem__, words)) / n_words < self.max_non_alpha_words_ratio
        ):
            return False, "gopher_below_alpha_threshold"
        if self.min_stop_words and len(self.stop_words.intersection(words)) < self.min_stop_words:
            return False, "gopher_enough_stop_words"
        return True


class C4Quality(C4QualityFilter):
    """datatrove's C4 filter: line rules, document rules, at least `min_num_sentences`; edits the text."""

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if not self.split_paragraph:
            return super().filter(doc)
        longest = self.max_word_length
        kept: list[str] = []
        for line in doc.text.splitlines():
            line = line.strip()
            if longest != -1 and len(line) > longest and any(len(w) > longest for w in line.split()):
                continue
            stripped = line
            if self.remove_citations and "[" in line:
                line = CITATION_REGEX.sub("", line)
            if self.filter_no_terminal_punct and (
                not line.endswith(END_PUNCTUATION) or line.endswith(ELLIPSIS)
            ):
                continue
            # words counted before the citations are removed, as datatrove does
            if self.min_words_per_line > 0 and len(stripped.split()) < self.min_words_per_line:
                continue
            line_l = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in line_l:
                return False, "lorem_ipsum"
            if self.filter_javascript and "javascript" in line_l:
                continue
            if self.filter_curly_bracket and "{" in line:
                return False, "curly_bracket"
            if self.filter_policy and _POLICY.search(line_l):
                continue
            kept.append(line)
        if self.min_num_sentences != -1 and len(kept) < self.min_num_sentences:
            count = getattr(self.language, "sentence_count", None)
            sentences = 0
            for line in kept:
                sentences += count(line) if count else len(split_into_sentences(line, self.language))
                if sentences >= self.min_num_sentences:
                    break
            if sentences < self.min_num_sentences:
                return False, "too_few_sentences"
        doc.text = "\n".join(kept).strip()
        return True


class FineWebQuality(FineWebQualityFilter):
    """datatrove's FineWeb filter: terminal punctuation, short lines, duplicated lines, list-like text."""

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text = doc.text
        lines = [line for line in text.split("\n") if line.strip() != ""]
        if len(lines) == 0:
            return False, "empty"
        ratio = len([line for line in lines if line.endswith(self.stop_chars)]) / len(lines)
        if ratio < self.line_punct_thr and not (ratio == 0 and self.line_punct_exclude_zero):
            return False, "line_punct_ratio"
        ratio = len([line for line in lines if len(line) <= self.short_line_length]) / len(lines)
        if ratio > self.short_line_threshold:
            return False, "short_line_ratio"
        ratio = find_duplicates(lines)[1] / len(text.replace("\n", ""))
        if ratio > self.char_duplicates_ratio:
            return False, "char_dup_ratio"
        new_line = text.count("\n")
        at_least = getattr(self.language, "min_word_count", None)
        bound = at_least(text) if at_least is not None else 0
        if bound > 0 and new_line / bound <= self.new_line_ratio:
            return True  # more words can only lower the ratio
        if new_line / len(split_into_words(text, self.language)) > self.new_line_ratio:
            return False, "list_ratio"
        return True


# the faster filter for each of datatrove's
FASTER = {
    GopherRepetitionFilter: GopherRepetition,
    GopherQualityFilter: GopherQuality,
    C4QualityFilter: C4Quality,
    FineWebQualityFilter: FineWebQuality,
}
