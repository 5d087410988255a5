"""Word tokenization done once per text and shared by every quality heuristic, with datatrove's exact words.

datatrove's Gopher, C4 and FineWeb filters each call `split_into_words(text, language)`, and C4 calls
`split_into_sentences(line, language)` on every line it keeps, which tokenizes each line again. datatrove
keeps the last 5 results (`split_into_parts` is an `lru_cache(5)`), so Gopher quality reuses Gopher
repetition's words; but every tokenization runs spaCy in a fresh `memory_zone`, which throws away spaCy's
own cache of whitespace-separated spans, so every word is tokenized from scratch every time, and FineWeb
tokenizes C4's edited text again. `split_into_words` accepts a `WordTokenizer` object in place of a
language code, so `SharedWords` is given to datatrove's filters as their `language`: the filters
themselves run unchanged, and the words and sentences they see come from here.

What makes it faster, and why the words stay datatrove's (tested against datatrove's tokenizer on every
line and document of the demo corpus and a held-out one in `tests/test_data_quality_exact.py`):

- A text seen again (C4's lines are tokenized once for their sentences and once more for the words of
  the edited text, when C4 left it as it was) gets its tokens from a small memo of the last texts.
- spaCy's rule-based tokenizers (English, Finnish: `SPAN_CACHED`) cut the text into runs of whitespace and
  non-whitespace exactly as `Tokenizer._tokenize_affixes` does, and tokenize each run on its own (their
  special cases never contain whitespace, checked at load), so a run's tokens depend on the run alone.
  They are kept in a cache that lives across documents (bounded: cleared when it passes `max_cache`); only
  runs never seen before go through spaCy, together, in one memory zone.
- Japanese calls Sudachi directly: the words are its non-empty surfaces, stripped (spaCy's other tokens
  are whitespace); token offsets for sentences follow from the surfaces' lengths, which tile the text
  (no spaCy Doc with tags, lemmas and readings). Vietnamese runs pyvi's CRF through
  `vietnamese.VietnameseSegmenter` (the same model and tagger, features built faster). Hindi
  (`IndicWords`) is IndicNLP's tokenization with the punctuation padded by one split and join.
- C4 needs only the number of sentences of a line (`sentence_count`): spaCy's `Sentencizer` starts a
  sentence at the first token after one of its punctuation characters that is neither punctuation itself
  nor one of them, so the count comes from a string of token classes, one regular expression.
- FineWeb needs only whether newlines / words passes a ratio: `min_word_count` gives a lower bound
  (whitespace-separated runs; Vietnamese syllable boundaries no join can cross) that usually settles it.

Any other language is datatrove's own tokenizer, memoized. The filters that use these words are
`heuristics.py`'s.
"""

from __future__ import annotations

import re
from itertools import accumulate
from typing import Any

from datatrove.utils.text import split_into_sentences
from datatrove.utils.word_tokenizers import WordTokenizer, load_word_tokenizer, strip_strings

from quintet.data.curation.vietnamese import VietnameseSegmenter

SPAN_CACHED = ("en", "fi")  # spaCy language codes whose tokenizer is rule-based per whitespace run
_RUNS = re.compile(r"\s+|\S+")
_MEMO_SIZE = 8

Token = tuple[int, int]  # (start, end) character offsets in the text


class SharedWords(WordTokenizer):
    """datatrove's word tokenizer for `language` (e.g. `eng_Latn`), computed once per text."""

    def __init__(self, language: str, fast: bool = True, max_cache: int = 200_000):
        super().__init__(language)
        self.fast = fast
        self.max_cache = max_cache
        self._reference: WordTokenizer | None = None
        self._kind: str | None = None
        self._vietnamese: VietnameseSegmenter | None = None
        self._indic: IndicWords | None = None
        self._classes_: _TokenClasses | None = None
        self._run_marks: dict[str, str] = {}
        self._spans: dict[str, tuple[str, ...]] = {}
        self._memo: dict[tuple[str, str], Any] = {}
        self.calls = {"tokenized": 0, "memo_hits": 0, "span_hits": 0, "span_misses": 0}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # rebuilt in each worker
        state.update(_reference=None, _kind=None, _vietnamese=None, _indic=None, _classes_=None)
        state.update(_run_marks={}, _spans={}, _memo={})
        return state

    def __hash__(self) -> int:  # datatrove's load_word_tokenizer is an lru_cache keyed by the tokenizer
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    # datatrove's tokenizer and which fast path applies

    @property
    def reference(self) -> WordTokenizer:
        """datatrove's own tokenizer for this language (what the words must equal)."""
        if self._reference is None:
            self._reference = load_word_tokenizer(self.language)
            self._kind = self._choose_kind(self._reference) if self.fast else "reference"
        return self._reference

    @property
    def kind(self) -> str:
        self.reference  # noqa: B018  (sets _kind)
        return self._kind or "reference"

    @staticmethod
    def _choose_kind(tok: WordTokenizer) -> str:
        lang = getattr(tok, "language", None)
        if type(tok).__name__ == "IndicNLPTokenizer" and lang != "ur":
            return "indic"
        if type(tok).__name__ != "SpaCyTokenizer":
            return "reference"
        if lang in SPAN_CACHED:
            rules = getattr(tok.tokenizer.tokenizer, "rules", None) or {}
            if all(len(key) == 1 or not any(c.isspace() for c in key) for key in rules):
                return "spans"
            return "reference"
        return {"ja": "sudachi", "vi": "pyvi"}.get(lang, "reference")

    @property
    def indic(self) -> IndicWords:
        if self._indic is None:
            self._indic = IndicWords()
        return self._indic

    # WordTokenizer API, as datatrove's filters call it

    def word_tokenize(self, text: str) -> list[str]:
        key = ("words", text)
        if key in self._memo:
            self.calls["memo_hits"] += 1
            return list(self._memo[key])
        if self.kind == "reference":
            self.calls["tokenized"] += 1
            words = self.reference.word_tokenize(text)
        elif self.kind == "indic":
            self.calls["tokenized"] += 1
            words = self.indic.words(text)
        elif self.kind == "spans":  # the non-whitespace runs' tokens; whitespace runs' are stripped away
            self.calls["tokenized"] += 1
            runs = text.split()
            self._cache_runs(runs)
            cache = self._spans
            words = [piece for run in runs for piece in cache[run]]
        elif self.kind == "pyvi":  # the words themselves: pyvi's never start or end with whitespace
            self.calls["tokenized"] += 1
            words = self.vietnamese.word_strings(text)
        elif self.kind == "sudachi":  # the surfaces: spaCy's other tokens are whitespace, stripped away
            self.calls["tokenized"] += 1
            sudachi = self.reference.tokenizer.tokenizer.tokenizer
            words = [
                word
                for chunk in _sudachi_chunks(text)
                for word in strip_strings([m.surface() for m in sudachi.tokenize(chunk)])
            ]
        else:
            words = strip_strings([text[a:b] for a, b in self._tokens(text)])
        self._remember(key, tuple(words))
        return words

    def sentence_count(self, text: str) -> int:
        """`len(split_into_sentences(text, self))`, counted from the tokens' classes where they allow.

        The Sentencizer starts a sentence at each token that is neither punctuation nor one of its
        punctuation characters and follows one of them (with only punctuation between): with each token
        written as P (a sentence-ending character), Q (other punctuation) or N, that is each match of
        `P[PQ]*N`. datatrove's sentence split has one part more than there are such starts (one for an
        empty text).
        """
        if self.kind == "spans":
            marks = self._span_marks(text)
        elif self.kind == "pyvi":
            marks = self._pyvi_marks(text)
        else:
            marks = None
        if marks is None:
            return len(split_into_sentences(text, self))
        return 1 + len(_SENTENCE_START.findall(marks))

    def _span_marks(self, text: str) -> str:
        """The classes of spaCy's tokens of `text` (a run of N tokens written once: it holds one start).

        A word run's classes come from its cached pieces; a whitespace run is N unless it is the single
        space spaCy gives the word before it.
        """
        words = text.split()
        self._cache_runs(words)
        marks = self._run_marks
        if " ".join(words) == text:  # single spaces only: each is the trailing space of a word
            return "".join([marks[run] if run in marks else self._mark_run(run) for run in words])
        out: list[str] = []
        previous_word = False
        for run in _RUNS.findall(text):
            if run[0].isspace():
                if not (previous_word and run == " "):
                    out.append("N")
                previous_word = False
            else:
                out.append(marks[run] if run in marks else self._mark_run(run))
                previous_word = True
        return "".join(out)

    def _mark_run(self, run: str) -> str:
        classes = self._classes
        mark = self._run_marks[run] = "".join([classes[piece] for piece in self._spans[run]])
        return mark

    def _pyvi_marks(self, text: str) -> str | None:
        """The classes of spaCy's Vietnamese tokens from the syllables, where joining them changes none.

        pyvi never joins a syllable that is a substring of `string.punctuation`; where every punctuation
        syllable is one (else None), a joined word is N like the syllables it joins, and a run of N
        tokens holds at most one sentence start whether or not it is joined. A whitespace run is a token
        (N) unless it is the single space spaCy gives the syllable before it.
        """
        classes = self._classes
        marks: list[str] = []
        after_syllable = False
        for piece in self.vietnamese.pieces(text):
            if piece.isspace():
                if not (after_syllable and piece == " "):
                    marks.append("N")
                after_syllable = False
            else:
                marks.append(classes[piece])
                after_syllable = True
        joined = "".join(marks)
        return None if "X" in joined else joined

    def min_word_count(self, text: str) -> int:
        """A lower bound on `len(word_tokenize(text))`, exact where that is cheap (0: no bound known)."""
        words = self._memo.get(("words", text))
        if words is not None:
            return len(words)
        if self.kind == "spans":  # every whitespace-separated run is at least one word
            return len(text.split())
        if self.kind == "indic":  # cheap enough to count
            return len(self.word_tokenize(text))
        if self.kind == "pyvi":
            return self.vietnamese.min_words(text)
        return 0

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        key = ("spans", text)
        if key in self._memo:
            self.calls["memo_hits"] += 1
            return list(self._memo[key])
        if self.kind in ("reference", "indic"):
            spans = list(self.reference.span_tokenize(text))
        elif self.kind == "sudachi":
            from datatrove.utils.word_tokenizers import chunk_text_on_bytes

            spans = []
            for chunk in [text] if not text else chunk_text_on_bytes(text, 40000):
                start = spans[-1][1] if spans else 0  # datatrove's offset of the next chunk
                tokens = self._sudachi_tokens(chunk)
                spans += [(start + a, start + b) for a, b in self._sentences(chunk, tokens)]
        elif self.kind == "pyvi":
            spans = self._sentences(text, self._pyvi_sentence_tokens(text))
        else:
            spans = self._sentences(text, self._tokens(text))
        self._remember(key, tuple(spans))
        return spans

    def sent_tokenize(self, text: str) -> list[str]:
        return strip_strings([text[a:b] for a, b in self.span_tokenize(text)])

    # tokens (all of spaCy's, whitespace tokens included) of a text

    def _tokens(self, text: str) -> list[Token]:
        key = ("tokens", text)
        if key in self._memo:
            return self._memo[key]
        self.calls["tokenized"] += 1
        kind = self.kind
        if kind == "spans":
            tokens = self._span_tokens(text)
        elif kind == "sudachi":
            tokens, offset = [], 0
            for chunk in _sudachi_chunks(text):
                tokens += [(offset + a, offset + b) for a, b in self._sudachi_tokens(chunk)]
                offset += len(chunk)
        elif kind == "pyvi":
            tokens = self._pyvi_tokens(text)
        else:
            raise AssertionError(f"no token offsets for a {kind!r} tokenizer")
        self._remember(key, tokens)
        return tokens

    def _remember(self, key: tuple[str, str], value: Any) -> None:
        if len(self._memo) >= _MEMO_SIZE:
            self._memo.pop(next(iter(self._memo)))
        self._memo[key] = value

    def _span_tokens(self, text: str) -> list[Token]:
        """spaCy's tokens: the whitespace and non-whitespace runs `_tokenize_affixes` cuts, from the cache."""
        runs: list[tuple[int, str]] = []
        previous_word = False
        for m in _RUNS.finditer(text):
            start, run = m.start(), m.group()
            if run[0].isspace():
                if previous_word and run[0] == " ":  # one space after a word is that word's trailing space
                    start, run = start + 1, run[1:]
                previous_word = False
                if not run:
                    continue
            else:
                previous_word = True
            runs.append((start, run))
        self._cache_runs([run for _, run in runs])
        cache = self._spans
        tokens: list[Token] = []
        for start, run in runs:
            for piece in cache[run]:
                tokens.append((start, start + len(piece)))
                start += len(piece)
        return tokens

    def _cache_runs(self, runs: list[str]) -> None:
        """Make sure every run's tokens are in the cache (bounded: cleared when it would pass max_cache)."""
        cache = self._spans
        missing = [run for run in runs if run not in cache]
        if missing:
            if len(cache) + len(missing) > self.max_cache:
                cache.clear()
                self._run_marks.clear()
                missing = runs
            self._tokenize_runs(list(dict.fromkeys(missing)))
        self.calls["span_misses"] += len(missing)
        self.calls["span_hits"] += len(runs) - len(missing)

    def _tokenize_runs(self, runs: list[str]) -> None:
        nlp = self.reference.tokenizer
        words = [r for r in runs if not r[0].isspace()]
        with nlp.memory_zone():
            # whitespace runs one by one (joined, they would merge); words joined by single spaces, which
            # spaCy takes as trailing whitespace, so each comes back as its own run
            for run in runs:
                if run[0].isspace():
                    self._spans[run] = tuple(t.text for t in _spacy_tokens(nlp, run))
            if words:
                joined = " ".join(words)
                doc = _spacy_tokens(nlp, joined)
                bounds, pos = [], 0
                for w in words:
                    bounds.append(pos)
                    pos += len(w) + 1
                pieces: list[list[str]] = [[] for _ in words]
                index = 0
                for t in doc:
                    while index + 1 < len(words) and t.idx >= bounds[index + 1]:
                        index += 1
                    pieces[index].append(t.text)
                for w, p in zip(words, pieces, strict=True):
                    self._spans[w] = tuple(p)

    def _sudachi_tokens(self, text: str) -> list[Token]:
        """datatrove's JapaneseTokenizer's tokens (surfaces, merged spaces, gap tokens) as offsets.

        spaCy's alignment skips whitespace surfaces, gives a word the one space after it when the next
        surface is exactly " ", and makes a gap token of any other whitespace before the next word.
        datatrove's merging of consecutive space tokens only drops a space that follows another space,
        so it changes neither the words nor what follows a word: no part-of-speech tags are needed.
        Sudachi's surfaces are slices of the text in order, so where they join back into the text their
        offsets follow from their lengths; otherwise each word is searched for, as spaCy does.
        """
        sudachi = self.reference.tokenizer.tokenizer.tokenizer
        surfaces = [m.surface() for m in sudachi.tokenize(text)]
        if "" in surfaces:
            surfaces = [s for s in surfaces if s]
        if "".join(surfaces) != text:
            return _align(text, surfaces, lambda i: i + 1 < len(surfaces) and surfaces[i + 1] == " ")
        ends = list(accumulate(map(len, surfaces)))
        spans = [(end - len(s), end) for s, end in zip(surfaces, ends, strict=True)]
        blanks = [i for i, s in enumerate(surfaces) if s.isspace()]
        if not blanks:
            return spans
        # each run of whitespace surfaces becomes one gap token, less the " " the word before it keeps
        runs = [[blanks[0], blanks[0]]]
        for i in blanks[1:]:
            if i == runs[-1][1] + 1:
                runs[-1][1] = i
            else:
                runs.append([i, i])
        tokens: list[Token] = []
        done = 0
        for i, j in runs:
            tokens += spans[done:i]
            start = spans[i][0] + (i > 0 and surfaces[i] == " ")
            if start < spans[j][1]:
                tokens.append((start, spans[j][1]))
            done = j + 1
        tokens += spans[done:]
        return tokens

    @property
    def _classes(self) -> _TokenClasses:
        if self._classes_ is None:
            nlp = self.reference.tokenizer
            self._classes_ = _TokenClasses(
                nlp.get_pipe("sentencizer").punct_chars, _is_punct_getter(nlp), self.kind == "pyvi"
            )
        return self._classes_

    @property
    def vietnamese(self) -> VietnameseSegmenter:
        if self._vietnamese is None:
            self._vietnamese = VietnameseSegmenter(self.reference.tokenizer.tokenizer)
        return self._vietnamese

    def _pyvi_tokens(self, text: str) -> list[Token]:
        """spaCy's Vietnamese tokens: pyvi's words, and a gap token where spaCy's alignment leaves one."""
        tokens: list[Token] = []
        pos = 0
        for start, end in self.vietnamese.words(text):
            if start > pos:
                tokens.append((pos, start))
            tokens.append((start, end))
            pos = end + 1 if end < len(text) and text[end] == " " else end
        if pos < len(text):
            tokens.append((pos, len(text)))
        return tokens

    def _pyvi_sentence_tokens(self, text: str) -> list[Token]:
        """Tokens that give spaCy's Vietnamese sentences without pyvi's segmentation model, where they can.

        pyvi joins syllables into words, but never a syllable that is a substring of `string.punctuation`.
        When every punctuation syllable of the text is one, joining only merges neighbouring
        non-punctuation tokens, which moves no sentence start or end (the Sentencizer starts a sentence at
        the first non-punctuation token after a full stop); otherwise the full segmentation is used.
        """
        import string

        spans = self.vietnamese.syllables(text)
        syllables = [text[a:b] for a, b in spans]
        punct_chars = self.reference.tokenizer.get_pipe("sentencizer").punct_chars
        is_punct = _is_punct_getter(self.reference.tokenizer)
        if all(s in string.punctuation for s in syllables if s in punct_chars or is_punct(s)):
            return _align(text, syllables, space_after=None)
        return self._tokens(text)

    def _sentences(self, text: str, tokens: list[Token]) -> list[tuple[int, int]]:
        """spaCy's Sentencizer over `tokens`: (start_char, end_char) of each sentence, as `span_tokenize`."""
        if not tokens:
            return []
        nlp = self.reference.tokenizer
        punct_chars = nlp.get_pipe("sentencizer").punct_chars
        is_punct = _is_punct_getter(nlp)
        starts, seen_period = [0], False
        for i, (a, b) in enumerate(tokens):
            word = text[a:b]
            in_punct_chars = word in punct_chars
            if seen_period and not in_punct_chars and not is_punct(word):
                seen_period = False
                starts.append(i)
            elif in_punct_chars:
                seen_period = True
        ends = [*starts[1:], len(tokens)]
        return [(tokens[s][0], tokens[e - 1][1]) for s, e in zip(starts, ends, strict=True)]


_SENTENCE_START = re.compile("P[PQ]*N")


class IndicWords:
    """IndicNLP's `trivial_tokenize` (Brahmi scripts) then datatrove's `strip_strings`, the same words.

    IndicNLP replaces tabs by spaces, pads every character of its punctuation class with spaces (`re.sub`
    with a `\\1` template, which expands each match in Python), squeezes runs of spaces, removes the
    spaces inside number sequences such as `1 , 000` (all but one that starts the text: its
    `start > prev` test), and splits on spaces. Here the padding is a split on its own pattern (which
    keeps the punctuation) joined back with spaces: the same string; the rest is the same steps.
    """

    def __init__(self) -> None:
        from indicnlp.tokenize.indic_tokenize import pat_num_seq, triv_tokenizer_indic_pat

        self.punctuation = triv_tokenizer_indic_pat
        self.numbers = pat_num_seq

    def words(self, text: str) -> list[str]:
        padded = " ".join(self.punctuation.split(text.replace("\t", " ")))
        s = _SPACE_RUNS.sub(" ", padded).strip(" ")
        pieces, prev = [], 0
        for m in self.numbers.finditer(s):
            start, end = m.span()
            if start > prev:
                pieces += [s[prev:start], s[start:end].replace(" ", "")]
                prev = end
        if pieces:
            s = "".join(pieces) + s[prev:]
        return [word for word in map(str.strip, s.split(" ")) if word]


_SPACE_RUNS = re.compile(" +")


def _sudachi_chunks(text: str) -> list[str]:
    """The pieces datatrove's spaCy tokenizer hands Sudachi (at most 40,000 bytes each)."""
    from datatrove.utils.word_tokenizers import chunk_text_on_bytes

    return chunk_text_on_bytes(text, 40000) if text else []


class _TokenClasses(dict):
    """token text -> P (one of the Sentencizer's punctuation characters), Q (other punctuation) or N.

    With `pyvi`, punctuation that is not a substring of `string.punctuation` is X (pyvi may join it).
    """

    def __init__(self, punct_chars: Any, is_punct: Any, pyvi: bool):
        super().__init__()
        self.punct_chars, self.is_punct, self.pyvi = punct_chars, is_punct, pyvi

    def __missing__(self, token: str) -> str:
        import string

        if len(self) > 200_000:
            self.clear()
        mark = "P" if token in self.punct_chars else "Q" if self.is_punct(token) else "N"
        if self.pyvi and mark != "N" and token not in string.punctuation:
            mark = "X"
        self[token] = mark
        return mark


def _spacy_tokens(nlp: Any, text: str) -> Any:
    return nlp.tokenizer(text)  # the tokenizer alone: nlp() would add only the sentencizer's marks


def _is_punct_getter(nlp: Any) -> Any:
    from spacy.attrs import IS_PUNCT

    return nlp.vocab.lex_attr_getters[IS_PUNCT]


def _align(text: str, words: list[str], space_after: Any) -> list[Token]:
    """Offsets of `words` in `text` with a gap token for each stretch between them, as spaCy aligns.

    `space_after(i)` says whether one space after word i belongs to it (datatrove's Japanese rule: the next
    token is a space); None uses spaCy's `get_words_and_spaces` rule (the next character is a space).
    """
    tokens: list[Token] = []
    pos = 0
    for i, word in enumerate(words):
        if word.isspace():
            continue
        start = text.index(word, pos)  # == text[pos:].index(word) + pos
        if start > pos:
            tokens.append((pos, start))
        tokens.append((start, start + len(word)))
        pos = start + len(word)
        if space_after is None:
            if pos < len(text) and text[pos] == " ":
                pos += 1
        elif space_after(i):
            pos += 1
    if pos < len(text):
        tokens.append((pos, len(text)))
    return tokens
