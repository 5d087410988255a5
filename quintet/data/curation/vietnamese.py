"""pyvi's Vietnamese word segmentation as spaCy uses it, with the CRF's features built faster.

spaCy's Vietnamese tokenizer (`use_pyvi`, what datatrove's `vie_Latn` word tokenizer runs) cuts the text
into syllables with a regular expression, tags them B_W / I_W with pyvi's CRF (python-crfsuite), and joins
an I_W syllable to the word before it unless either is punctuation, starts with a digit, or it is
capitalized after a lower-case one. pyvi builds each syllable's features as a dict in Python
(`ViTokenizer.word2features`), which costs several times the tagging itself. Here the same features reach
the same crfsuite tagger of the same model file as lists of strings, in the same order:

- the feature templates (pyvi's `word2features`): `bias`; the syllable's `word.lower()`, `word.isupper()`,
  `word.istitle()`, `word.isdigit()`; the previous syllable's `-1:word.lower()`, `-1:word.istitle()`,
  `-1:word.isupper()` and whether the two lower-cased form a known two-syllable word (`-1:word.bi_gram()`);
  whether the two before and this one form a known three-syllable word (`-2:word.tri_gram()`); the next
  syllable's `+1:` features and bigram the same way, and `+2:word.tri_gram()`;
- python-crfsuite turns `{name: "text"}` into the attribute `name:text` with value 1 and `{name: True}`
  into `name` with value 1; a false flag has value 0, which adds exactly 0 to every label's score, so it
  is left out; the others keep pyvi's order, so each label's score is the same sum in the same order;
- a syllable's strings (and its lower case) are remembered per syllable, and the bigram and trigram tests
  are done once per position, on the lower-cased syllables joined by spaces (lower-casing never looks past
  a space, so that is the lower case of the joined text, as pyvi tests).

The words come back as character offsets: the syllable pattern and the whitespace between syllables tile
the text, so a word of several syllables is the text from its first syllable's start to its last one's end
(pyvi's join of the syllables with the whitespace between them). `tests/test_data_quality_exact.py`
checks the words against spaCy's on every Vietnamese document of the demo corpus and a held-out one.
"""

from __future__ import annotations

import re
import string
import tempfile
from collections.abc import Sequence
from itertools import accumulate
from operator import add
from pathlib import Path
from typing import Any

# spaCy's `VietnameseTokenizer.pyvi_sylabelize_with_ws` pattern (pyvi's `sylabelize` with whitespace kept)
_SYLLABLE_PATTERN = (
    r"[A-ZĐ]+\.|Tp\.|Mr\.|Mrs\.|Ms\.|Dr\.|ThS\.|==>|->|\.\.\.|>>|\w+://[^\s]+"
    r"|[a-zA-Z0-9_.+-]+@(?:[a-zA-Z0-9-]+\.)+[a-zA-Z0-9-]+|\d+(?:[\.,_]\d+)+|[^\w\s]|\w+"
)
_PIECE = re.compile(r"\s+|" + _SYLLABLE_PATTERN)
# No alternative but `\s+` matches at whitespace, so without it the matches are the same syllables.
_SYLLABLE = re.compile(_SYLLABLE_PATTERN)
_MAX_CACHE = 200_000
_BIAS = "bias"
_PREV_BIGRAM = ("-1:word.bi_gram()",)
_PREV_TRIGRAM = ("-2:word.tri_gram()",)
_NEXT_BIGRAM = ("+1:word.bi_gram()",)
_NEXT_TRIGRAM = ("+2:word.tri_gram()",)


class _Syllable:
    """One syllable's feature strings: as the current (`own`), previous (`prev`) and next (`next`) one."""

    __slots__ = ("lower", "own", "prev", "next", "title", "hard")

    def __init__(self, s: str, known: frozenset[str] | None):
        lower = self.lower = s.lower()
        upper, title = s.isupper(), s.istitle()
        own = [_BIAS, "word.lower():" + lower]
        own += ["word.isupper()"] * upper + ["word.istitle()"] * title + ["word.isdigit()"] * s.isdigit()
        prev = ["-1:word.lower():" + lower] + ["-1:word.istitle()"] * title + ["-1:word.isupper()"] * upper
        after = ["+1:word.lower():" + lower] + ["+1:word.istitle()"] * title + ["+1:word.isupper()"] * upper
        if known is not None:  # attributes the model does not know add nothing to any score
            own, prev, after = ([a for a in x if a in known] for x in (own, prev, after))
        self.own, self.prev, self.next = tuple(own), tuple(prev), tuple(after)
        # pyvi's join rules: punctuation (a substring of `string.punctuation`), first character
        self.title = s[0].istitle()
        self.hard = s in string.punctuation or s[0].isdigit()


class VietnameseSegmenter:
    """spaCy's pyvi segmentation of a text into words, as (start, end) offsets; `tokenizer` is spaCy's."""

    def __init__(self, tokenizer: Any):
        pyvi = tokenizer.ViTokenizer.ViTokenizer
        self.tagger = pyvi.model.tagger_
        self.bi_grams: set[str] = pyvi.bi_grams
        self.tri_grams: set[str] = pyvi.tri_grams
        self.known = _model_attributes(self.tagger)
        self._syllables: dict[str, _Syllable] = {}

    def syllables(self, text: str) -> list[tuple[int, int]]:
        """(start, end) of each non-whitespace syllable, as spaCy's `pyvi_sylabelize_with_ws` cuts them."""
        pieces = _PIECE.findall(text)
        ends = list(accumulate(map(len, pieces)))
        return [(end - len(p), end) for p, end in zip(pieces, ends, strict=True) if not p.isspace()]

    def pieces(self, text: str) -> list[str]:
        """The syllables and the whitespace runs between them, in order: they tile the text."""
        return _PIECE.findall(text)

    def _info(self, words: list[str]) -> list[_Syllable]:
        cache = self._syllables
        if len(cache) > _MAX_CACHE:
            cache.clear()
        out = []
        for w in words:
            info = cache.get(w)
            if info is None:
                info = cache[w] = _Syllable(w, self.known)
            out.append(info)
        return out

    def features(self, words: list[str], info: list[_Syllable] | None = None) -> list[Sequence[str]]:
        """Each syllable's attributes for the tagger (pyvi's `sent2features`, minus the zero-valued ones)."""
        info = info if info is not None else self._info(words)
        n = len(info)
        lowers = [s.lower for s in info]
        spaced = [low + " " for low in lowers]
        bigram = list(map(self.bi_grams.__contains__, map(add, spaced[:-1], lowers[1:])))
        firsts = map(add, spaced[:-2], spaced[1:-1])
        trigram = list(map(self.tri_grams.__contains__, map(add, firsts, lowers[2:])))
        if n < 4:
            return [_item(info, i, bigram, trigram) for i in range(n)]
        own = [s.own for s in info]
        prev = [s.prev for s in info]
        after = [s.next for s in info]
        prev_bi = [_PREV_BIGRAM if b else () for b in bigram]
        next_bi = [_NEXT_BIGRAM if b else () for b in bigram]
        prev_tri = [_PREV_TRIGRAM if t else () for t in trigram]
        next_tri = [_NEXT_TRIGRAM if t else () for t in trigram]
        # syllables 2 .. n-3 have all four neighbours; the two at each end are built one by one
        middle = [
            [*a, *b, *c, *d, *e, *f, *g]
            for a, b, c, d, e, f, g in zip(
                own[2:-2], prev[1:-3], prev_bi[1:-2], prev_tri[:-2], after[3:-1], next_bi[2:-1], next_tri[2:],
                strict=True,
            )
        ]
        ends = [_item(info, i, bigram, trigram) for i in (0, 1, n - 2, n - 1)]
        return [*ends[:2], *middle, *ends[2:]]

    def _joined(self, words: list[str], info: list[_Syllable]) -> set[int]:
        """The syllables (by index) that pyvi joins to the word before them."""
        labels = self.tagger.tag(self.features(words, info))
        return {i for i, t in enumerate(labels) if t == "I_W" and i and not _boundary(info[i - 1], info[i])}

    def word_strings(self, text: str) -> list[str]:
        """pyvi's words as spaCy gives them: a joined word keeps the whitespace between its syllables."""
        pieces = _PIECE.findall(text)
        blank = list(map(str.isspace, pieces))
        if not any(blank):
            words, where = pieces, None
        else:
            where = [i for i, b in enumerate(blank) if not b]
            words = [pieces[i] for i in where]
        if not words:
            return []
        joined = self._joined(words, self._info(words))
        if not joined:
            return words
        out: list[str] = []
        for k, word in enumerate(words):
            if k in joined:
                gap = "" if where is None or where[k] - where[k - 1] == 1 else pieces[where[k] - 1]
                out[-1] += gap + word
            else:
                out.append(word)
        return out

    def words(self, text: str) -> list[tuple[int, int]]:
        """(start, end) of each word: syllables joined where the CRF says I_W and pyvi's rules allow."""
        spans = self.syllables(text)
        if not spans:
            return []
        words = [text[a:b] for a, b in spans]
        joined = self._joined(words, self._info(words))
        if not joined:
            return spans
        starts = [i for i in range(len(spans)) if i not in joined]
        lasts = [*starts[1:], len(spans)]
        return [(spans[a][0], spans[b - 1][1]) for a, b in zip(starts, lasts, strict=True)]

    def min_words(self, text: str) -> int:
        """A lower bound on the number of words: 1 + the syllable boundaries no label can join."""
        words = _SYLLABLE.findall(text)
        if not words:
            return 0
        info = self._info(words)
        return 1 + sum(map(_boundary, info[:-1], info[1:]))


def _model_attributes(tagger: Any) -> frozenset[str] | None:
    """The attribute names in the CRF model's dictionary, from crfsuite's text dump of the model.

    crfsuite skips an attribute that is not in the dictionary, so leaving it out changes no score. None
    (nothing is left out) when the dump does not list as many attributes as its header says.
    """
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.txt"
        tagger.dump(str(path))
        lines = path.read_text(encoding="utf-8", errors="surrogateescape").split("\n")
    header = re.search(r"num_attrs: (\d+)", "\n".join(lines[:20]))
    start = lines.index("ATTRIBUTES = {") if "ATTRIBUTES = {" in lines else -1
    names = []
    for line in lines[start + 1 :] if start >= 0 else []:
        if line == "}":
            break
        m = re.match(r" +\d+: (.*)$", line)
        if m:
            names.append(m.group(1))
    if header is None or int(header.group(1)) != len(names):
        return None
    return frozenset(names)


def _item(info: list[_Syllable], i: int, bigram: list[bool], trigram: list[bool]) -> tuple[str, ...]:
    """Syllable i's attributes, in pyvi's order (`word2features`)."""
    n = len(info)
    item = info[i].own
    if i > 0:
        item = item + info[i - 1].prev + (_PREV_BIGRAM if bigram[i - 1] else ())
        if i > 1 and trigram[i - 2]:
            item = item + _PREV_TRIGRAM
    if i < n - 1:
        item = item + info[i + 1].next + (_NEXT_BIGRAM if bigram[i] else ())
        if i < n - 2 and trigram[i]:
            item = item + _NEXT_TRIGRAM
    return item


def _boundary(before: _Syllable, after: _Syllable) -> bool:
    """Whether pyvi keeps two syllables apart whatever the label (spaCy's `pyvi_tokenize`): either is
    punctuation or starts with a digit, or the second is capitalized and the first is not."""
    return before.hard or after.hard or (after.title and not before.title)
