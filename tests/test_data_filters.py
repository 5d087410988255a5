"""Curation steps one at a time: their pure parts against obvious references, their drop reasons."""

import random
import unicodedata

import numpy as np
import pytest
from datatrove.data import Document
from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

from quintet.data.curation.dedup import DedupSettings, ScriptAwareWordTokenizer, collision_probability
from quintet.data.curation.language import LanguageFilter
from quintet.data.curation.numbers import NumberHeavyFilter, character_fractions
from quintet.data.curation.quality import QualityFilter, code_quality, language_settings
from quintet.data.curation.toxicity import ToxicityFilter, compile_terms, find_terms


def _doc(text, **meta):
    return Document(text=text, id="d", metadata=meta)


def _reference_fractions(text):
    chars = [c for c in text if not c.isspace()]
    cats = [unicodedata.category(c)[0] for c in chars]
    digits = sum(c == "N" for c in cats)
    return digits / len(chars), (digits + sum(c in "PS" for c in cats)) / len(chars)


@pytest.mark.parametrize(
    "text",
    [
        "Plain English prose, with a comma.",
        "हिंदी में लिखा गया वाक्य है।",
        "日本語の文章です。",
        "2019 | 12,345 | +4.5 %",
        "x",
    ],
)
def test_character_fractions_match_unicode_categories(text):
    assert character_fractions(text) == pytest.approx(_reference_fractions(text))


def test_hindi_vowel_signs_are_not_symbols():
    digits, non_letters = character_fractions("किताबों के बिना घर फूलों के बिना बगीचे जैसा होता है।")
    assert digits == 0 and non_letters < 0.05


def test_numbers_filter_reasons():
    f = NumberHeavyFilter()
    assert f.filter(_doc("January | 1234 | 56,789 | +4.5 %\nFebruary | 2345 | 67,890 | -1.2 %")) == (
        False,
        "digit_heavy",
    )
    assert f.filter(_doc("### *** --- ### *** --- ((( ))) !!! ??? ### abc")) == (False, "symbol_heavy")
    assert f.filter(_doc("A normal sentence about the year 2019 and 12 people."))
    assert f.filter(_doc("x = [1, 2, 3] # 4 5 6 7 8 9", declared_lang="code"))


def test_toxicity_whole_words_and_normalisation():
    pattern = compile_terms(["idiot", "piece of shit", "बेवकूफ़"])
    assert find_terms(pattern, "What an IDIOT.") == ["idiot"]
    assert find_terms(pattern, "idiotic ideas and idiots") == []  # whole words only
    assert find_terms(pattern, "a piece   of\nshit") == ["piece   of\nshit"]
    decomposed = unicodedata.normalize("NFD", "वह बेवकूफ़ है")
    assert len(find_terms(pattern, decomposed)) == 1
    assert find_terms(pattern, "बेवकूफ़ों") == []  # a longer word (a vowel sign follows)
    substring = compile_terms(["バカ野郎"], substring=True)
    assert find_terms(substring, "あのバカ野郎が") == ["バカ野郎"]


def test_toxicity_filter_and_user_list(tmp_path):
    words = tmp_path / "en.txt"
    words.write_text("# my list\nbanana\n", encoding="utf-8")
    f = ToxicityFilter(languages=["en", "ja"], lists={"en": str(words)})
    doc = _doc("I like a banana.", language="en")
    assert f.filter(doc) == (False, "toxic_terms")
    assert doc.metadata["toxic_terms"] == ["banana"]
    assert f.filter(_doc("You idiot.", language="en"))  # the built-in list was replaced
    assert f.filter(_doc("黙れ、このクズが。", language="ja")) == (False, "toxic_terms")
    with pytest.raises(ValueError, match="no built-in word list for 'de'"):
        ToxicityFilter(languages=["de"])


def test_language_filter():
    f = LanguageFilter(accuracy="low")
    english = _doc("The library opens early on Saturdays, and the reading room is quiet all afternoon.")
    assert f.filter(english) and english.metadata["language"] == "en"
    german = _doc("Die neue Bibliothek hat einen Lesesaal mit großen Fenstern und einem schönen Blick.")
    assert f.filter(german) == (False, "other_language")
    assert german.metadata["language"] == "de"
    code = _doc("def f(x):\n    return x + 1\n", declared_lang="code")
    assert f.filter(code) and code.metadata["language"] == "code"
    mixed = "Sauna oli kuuma ja järvi kylmä, the lake was cold"  # en, with lingua's confidence ~0.55
    assert LanguageFilter(threshold=0.5, accuracy="low").filter(_doc(mixed))
    assert LanguageFilter(threshold=0.9, accuracy="low").filter(_doc(mixed)) == (False, "low_confidence")
    with pytest.raises(ValueError, match="unknown language code 'xx'"):
        LanguageFilter(languages=["en", "xx"])


def test_quality_settings_per_language():
    ja = language_settings("ja")
    assert ja["gopher_quality"]["min_avg_word_length"] == 1
    assert ja["c4"]["filter_no_terminal_punct"] is False
    assert "の" in ja["gopher_quality"]["stop_words"]
    en = language_settings("en", {"gopher_quality": {"min_doc_words": 10}})
    assert en["gopher_quality"]["min_doc_words"] == 10 and "the" in en["gopher_quality"]["stop_words"]
    with pytest.raises(ValueError, match="unknown setting 'min_words'"):
        language_settings("en", {"gopher_quality": {"min_words": 10}})
    with pytest.raises(ValueError, match="unknown filter 'gopher'"):
        language_settings("en", {"gopher": {}})


def test_quality_filter_reasons():
    f = QualityFilter(languages=["en"])
    short = _doc("A cat sat on the mat while a dog slept nearby.", language="en")
    assert f.filter(short) == (False, "gopher_repetition:top_3_gram")  # in a short text, any 3-gram is 18%
    only_gopher = QualityFilter(languages=["en"], filters=["gopher_quality"])
    assert only_gopher.filter(short) == (False, "gopher_quality:gopher_short_doc")
    assert f.filter(_doc("x", language="xx")) == (False, "no_thresholds_for_language")
    assert f.filter(_doc("def f():\n    return 1\n", language="code"))
    assert code_quality("a" * 2000) == (False, "code_long_line")
    assert code_quality("{}()[];:\n" * 10) == (False, "code_low_alnum")


def test_collision_probability_matches_datatrove():
    # datatrove's minhash.py: "threshold is (1/14)^(1/8) ~ 0.72", "probability of inclusion for s=0.8: 0.924"
    assert collision_probability(0.8) == pytest.approx(0.924, abs=5e-4)
    assert collision_probability((1 / 14) ** (1 / 8)) == pytest.approx(1 - (1 - 1 / 14) ** 14)


def test_minhash_collisions_follow_the_formula():
    """datatrove's signatures on shingle sets of known Jaccard similarity collide as 1 - (1 - s^8)^14."""
    settings = DedupSettings()
    rng = random.Random(0)
    step = MinhashDedupSignature("/tmp/unused-minhash-sigs", config=settings.minhash_config())
    for similarity, trials in ((0.5, 200), (0.8, 200)):
        hits = 0
        for _ in range(trials):
            shared = 400
            # |A ∩ B| = shared, |A ∪ B| = shared / s: split the rest between A and B
            extra = round(shared / similarity) - shared
            base = [rng.getrandbits(60) for _ in range(shared + extra)]
            a = np.array(base[:shared] + base[shared : shared + extra // 2], dtype=np.uint64).reshape(-1, 1)
            b = np.array(base[:shared] + base[shared + extra // 2 :], dtype=np.uint64).reshape(-1, 1)
            sa, sb = step.get_signature(a), step.get_signature(b)
            hits += any(x == y for x, y in zip(sa, sb, strict=True))
        expected = collision_probability(similarity)
        assert abs(hits / trials - expected) < 4 * (expected * (1 - expected) / trials) ** 0.5 + 0.01


def test_script_aware_tokenizer():
    tok = ScriptAwareWordTokenizer()
    assert tok.word_tokenize("the quick brown fox") == ["the", "quick", "brown", "fox"]
    words = tok.word_tokenize("新しい図書館には大きな窓がある")
    assert len(words) > 3 and "".join(words) == "新しい図書館には大きな窓がある"


def test_candidate_languages_from_scripts_and_letters():
    from quintet.data.curation.scripts import candidate_languages

    targets = ("en", "fi", "hi", "ja", "vi")
    english = "The library opens early on Saturdays, and the reading room is quiet all afternoon. " * 4
    found = candidate_languages(english, targets)
    assert {"en", "nl", "id", "fi", "vi"} <= found and not {"de", "fr", "pl", "ru", "ja"} & found
    german = "Die Bibliothek öffnet früh, und der Lesesaal ist ruhig. Über den Fluss führt eine Brücke. " * 3
    assert "de" in candidate_languages(german, targets)
    assert candidate_languages("यह एक वाक्य है। यह दूसरा वाक्य है।", targets) == {"hi", "mr"}
    assert "ja" in candidate_languages("これは日本語の文章です。", targets)
    assert candidate_languages("12345 !!! ---", targets) is None  # no letters: lingua gets every language
    short = "Ein kurzer Satz ohne Umlaut."  # under min_letters: markers are not required
    assert "de" in candidate_languages(short, targets)


def test_language_filter_batched_with_prefilter_matches_unfiltered():
    texts = [
        "The library opens early on Saturdays, and the reading room is quiet all afternoon.",
        "Kirjasto aukeaa lauantaisin aikaisin, ja lukusali on hiljainen koko iltapäivän.",
        "Thư viện mở cửa sớm vào thứ Bảy, và phòng đọc yên tĩnh suốt buổi chiều.",
        "Die neue Bibliothek hat einen Lesesaal mit großen Fenstern und einem schönen Blick.",
        "La nouvelle bibliothèque a une salle de lecture avec de grandes fenêtres.",
        "यह पुस्तकालय शनिवार को जल्दी खुलता है और पढ़ने का कमरा शांत रहता है।",
        "図書館は土曜日の朝早く開き、閲覧室は午後ずっと静かです。",
    ]
    plain = LanguageFilter(accuracy="low", prefilter=False)
    fast = LanguageFilter(accuracy="low", prefilter=True, batch_size=4)
    assert [lang for lang, _ in fast.detect_many(texts)] == [plain.detect(t)[0] for t in texts]
    docs = [_doc(t) for t in texts]
    results = fast.filter_batch(docs)
    assert [d.metadata["language"] for d in docs] == ["en", "fi", "vi", "de", "fr", "hi", "ja"]
    assert results[3] == (False, "other_language") and results[0] is True
    with pytest.raises(ValueError, match="batch_size = 0"):
        LanguageFilter(batch_size=0)
