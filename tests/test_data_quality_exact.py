"""The quality step with shared words decides exactly as datatrove's own filters, document by document.

Both run on every target-language document of the demo corpus (seed 0) and of a held-out corpus generated
with another seed, plus edge cases (whitespace runs, citations, curly brackets, empty lines, long texts).
The reference is datatrove's Gopher repetition, Gopher quality, C4 and FineWeb filters built with the
language code, each tokenizing the text itself, applied in the same order with the same thresholds; the
result compared is (kept, reason, text after C4's edits).
"""

import pytest
from datatrove.data import Document
from datatrove.utils.text import split_into_sentences, split_into_words

from quintet.data.curation.quality import (
    WORD_TOKENIZER,
    QualityFilter,
    datatrove_filters,
    language_settings,
)
from quintet.data.curation.words import SharedWords
from quintet.data.demo_corpus import DemoCorpusConfig, generate_demo_corpus, load_labels, read_corpus_texts

EDGE_CASES = {
    "en": [
        "",
        "   leading spaces.  Two  spaces here.\tA tab!\n\n\nThree newlines. \u00a0Non-breaking space.",
        "A citation[1] here. And [edit] there. Don't stop... Really? Yes! \"Quoted.\" 'Single.'",
        "Mr. Smith went to Washington, D.C. at 5 p.m. on Jan. 3rd. He paid $4.50 (tax incl.) — ok.",
        "function f() { return 1; } is JavaScript. Lorem ipsum dolor sit amet. Privacy policy applies.",
        "e-mail: a.b@example.com, url https://example.com/x?y=1. Numbers 1,000.5 and 3-4 pm.",
        ("The same line is repeated here with words.\n" * 30),
    ],
    "fi": ['Hän sanoi: "Tule!"  Me tulimme.\n\nKello 10.30 alkoi kokous. Esim. tämä. Jne...'],
    "en_paths": [  # the faster filters' own paths: sentence counts, citations, bullets, lists, repeats
        "First one.  . Second one! Third?  Fourth.\nA second line here, ends well.",
        "[1][2] a b.\nCitation [3] counts words before removal.\nShort [edit] one. Two. Three. Four. Five.",
        "Hello.  .  . world. Again! \"Quoted.\" 'Single.' Done.\n\tTabbed line is here too.",
        "\n".join(f"- item number {i} of the list." for i in range(12)),
        "\n".join(f"• bullet {i} ..." for i in range(8)) + "\nSome ### hash ### words ### here.",
        "Lorem ipsum dolor sit amet, this line is long enough. Another sentence.",
        "Use JavaScript to see this. Read our privacy policy. A {curly} line. Fine line here.",
        " ".join(["the cat sat on the mat"] * 12) + ". " + " ".join(["a b c d e"] * 20) + ".",
        "\n".join(["word"] * 40),
        "ab c abc a bc ab c abc a bc ab c abc a bc ab c abc. " * 6,
    ],
    "hi": [
        "यह एक वाक्य है। यह दूसरा वाक्य है!  और यह तीसरा?\n\nनया अनुच्छेद है।",
        "1 , 2 और 3 , 4 ठीक है।\tटैब \\ बैकस्लैश [x] ^a-b 10 : 30 बजे॥\nनया 1 . 5 अनुच्छेद\u00a0है",
    ],
    "ja": [
        "これは文です。  これも文です！\n\n新しい段落です。「引用」と言った。",
        " \u3000全角スペース。",
        "\t先頭のタブ。 \n  二つの空白。\u3000\u3000全角が二つ。 English words here. 末尾の空白。  ",
        "東京都に住んでいます。" * 30,
    ],
    "vi": [
        "Việt Nam là một quốc gia.  Hà Nội là thủ đô!\n\nTp. Hồ Chí Minh có 9.000.000 người dân.",
        "Ông Mr. Nam gửi thư tới nam@example.com... Xem https://vi.wikipedia.org/wiki/Hà_Nội … được!",
        "Đây là câu một.  . Câu hai ==> câu ba -> hết >> tiếp. ThS. Lan và Dr. Minh.\n\tDòng có tab.",
        "\n".join(f"Mục {i} của danh sách" for i in range(15)),
        "Hà Nội Hà Nội Hà Nội là thủ đô của Việt Nam. " * 10,
    ],
}


def _corpus_documents(root, seed):
    generate_demo_corpus(root, DemoCorpusConfig(seed=seed))
    labels = load_labels(root)
    return [(doc_id, text, labels[doc_id].lang) for doc_id, text in read_corpus_texts(root).items()]


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    docs = _corpus_documents(tmp_path_factory.mktemp("demo"), 0)
    docs += _corpus_documents(tmp_path_factory.mktemp("heldout"), 1)
    docs += [
        (f"edge-{lang}-{i}", t, lang[:2]) for lang, texts in EDGE_CASES.items() for i, t in enumerate(texts)
    ]
    docs += [("edge-long", "A long document with many sentences. " * 5000, "en")]
    return [d for d in docs if d[2] in WORD_TOKENIZER]


def _reference(lang, text):
    """datatrove's filters, each tokenizing for itself."""
    doc = Document(text=text, id="x", metadata={"language": lang})
    for key, f in datatrove_filters(lang, language_settings(lang)):
        result = f.filter(doc)
        keep, reason = result if isinstance(result, tuple) else (result, None)
        if not keep:
            return False, f"{key}:{reason or 'rejected'}", doc.text
    return True, None, doc.text


def test_decisions_equal_datatrove_filters(documents):
    quality = QualityFilter()
    mismatches, per_language = [], {}
    for doc_id, text, lang in documents:
        expected = _reference(lang, text)
        doc = Document(text=text, id=doc_id, metadata={"language": lang})
        result = quality.filter(doc)
        keep, reason = result if isinstance(result, tuple) else (result, None)
        got = (keep, reason, doc.text)
        per_language.setdefault(lang, [0, 0])[expected[0]] += 1
        if got != expected:
            mismatches.append((doc_id, expected[:2], got[:2]))
    assert not mismatches, mismatches[:5]
    for lang, (dropped, kept) in per_language.items():  # both outcomes are exercised in every language
        assert dropped > 0 and kept > 0, (lang, dropped, kept)
    assert all(quality.words[lang].kind != "reference" for lang in ("en", "fi", "hi", "ja", "vi"))


def test_words_and_sentences_equal_datatrove_tokenizers(documents):
    """Every document's words, and every line's sentences, as datatrove's tokenizer gives them."""
    shared = {lang: SharedWords(code) for lang, code in WORD_TOKENIZER.items()}
    for doc_id, text, lang in documents:
        code = WORD_TOKENIZER[lang]
        assert split_into_words(text, shared[lang]) == split_into_words(text, code), doc_id
        for line in text.splitlines()[:40]:
            line = line.strip()
            expected = split_into_sentences(line, code)
            assert split_into_sentences(line, shared[lang]) == expected, (doc_id, line)
            assert shared[lang].sentence_count(line) == len(expected), (doc_id, line)
    assert shared["en"].calls["span_hits"] > shared["en"].calls["span_misses"]  # the cache is used


def test_shared_words_tokenize_each_text_once():
    quality = QualityFilter(languages=["en"], filters=["gopher_repetition", "gopher_quality", "fineweb"])
    text = "\n".join(
        [
            "The harbour was quiet in the early morning, and the boats rocked gently at their moorings.",
            "Fishermen who had been out all night carried their catch to the market on the old stone quay.",
            "A baker opened the shutters of a small shop that smelled of fresh bread and warm butter.",
            "Children walked to school with their bags, talking about a football match from the weekend.",
            "By noon the sun had burned away the fog, and tourists began to fill the narrow streets.",
            "An old man sat on a bench with a newspaper, watching the gulls circle over the water.",
            "In the evening the lights of the taverns came on one by one along the curve of the bay.",
        ]
    )
    assert quality.filter(Document(text=text, id="x", metadata={"language": "en"})) is True
    calls = quality.words["en"].calls
    assert calls["tokenized"] == 1, calls  # three filters, one tokenization


def test_reference_without_shared_words():
    quality = QualityFilter(languages=["en"], shared_words=False)
    assert quality.words["en"] is None
    text = "A cat sat on the mat while a dog slept nearby."
    short = Document(text=text, id="x", metadata={"language": "en"})
    assert quality.filter(short) == (False, "gopher_repetition:top_3_gram")


def test_each_filter_equals_its_datatrove_filter(documents):
    """Each faster filter alone against datatrove's alone (so C4 and FineWeb also see the documents that
    Gopher would have dropped): the same result and the same edited text, on the edge cases and on 120
    corpus documents per language."""
    per_language: dict[str, int] = {}
    sample = []
    for doc_id, text, lang in documents:
        if doc_id.startswith("edge") or per_language.get(lang, 0) < 120:
            per_language[lang] = per_language.get(lang, 0) + 1
            sample.append((doc_id, text, lang))
    shared = {lang: SharedWords(code) for lang, code in WORD_TOKENIZER.items()}
    pairs = {
        lang: list(
            zip(
                datatrove_filters(lang, language_settings(lang), words=shared[lang]),
                datatrove_filters(lang, language_settings(lang)),
                strict=True,
            )
        )
        for lang in WORD_TOKENIZER
    }
    outcomes = set()
    for doc_id, text, lang in sample:
        for (key, fast), (_, reference) in pairs[lang]:
            got_doc, expected_doc = Document(text=text, id=doc_id), Document(text=text, id=doc_id)
            got, expected = fast.filter(got_doc), reference.filter(expected_doc)
            assert (got, got_doc.text) == (expected, expected_doc.text), (doc_id, key)
            outcomes.add((key, expected if isinstance(expected, tuple) else True))
    for key in ("gopher_repetition", "gopher_quality", "c4", "fineweb"):  # kept and dropped, by each
        assert (key, True) in outcomes and any(k == key and o is not True for k, o in outcomes), key
