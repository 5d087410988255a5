"""Which languages a text can be in, from its characters alone: the cheap test before lingua.

lingua compares a text's character n-grams with the model of every candidate language, so its cost grows
with the number of candidates (75 by default). Two facts cut the list before it runs:

- the script: a text written in Devanagari is Hindi or Marathi, kana is Japanese, Cyrillic is one of
  8 languages; lingua's own rules find the same, but after it has been given all 75;
- the letters: a paragraph of French, German, Polish, Turkish, ... practically always contains some of
  its language's accented letters (`MARKERS`). With at least `min_letters` letters and none of them, that
  language is not a candidate. Languages with no such letters (English, Dutch, Indonesian, Swahili, ...)
  always stay, and so do the target languages.

The result is a superset of what lingua would pick on all but texts that avoid their own alphabet; the
labelled demo corpus measures what it changes (docs/data.md: precision and recall per language).
"""

from __future__ import annotations

import unicodedata

# lingua's languages by script (ISO 639-1).
SCRIPT_LANGUAGES = {
    "LATIN": (
        "af az bs ca cs cy da de en eo es et eu fi fr ga hr hu id is it la lg lt lv mi ms nb nl nn pl pt "
        "ro sk sl sn so sq st sv sw tl tn tr ts vi xh yo zu"
    ).split(),
    "CYRILLIC": "be bg kk mk mn ru sr uk".split(),
    "ARABIC": "ar fa ur".split(),
    "DEVANAGARI": ["hi", "mr"],
    "BENGALI": ["bn"],
    "GUJARATI": ["gu"],
    "GURMUKHI": ["pa"],
    "TAMIL": ["ta"],
    "TELUGU": ["te"],
    "THAI": ["th"],
    "GREEK": ["el"],
    "HEBREW": ["he"],
    "ARMENIAN": ["hy"],
    "GEORGIAN": ["ka"],
    "HANGUL": ["ko"],
    "HIRAGANA": ["ja"],
    "KATAKANA": ["ja"],
    "CJK": ["ja", "zh"],
}

# Letters that a paragraph of the language practically always contains (lower case).
MARKERS = {
    "az": "əığşçöü",
    "bs": "čćšžđ",
    "ca": "àèéíïòóúç",
    "cs": "áčďéěíňóřšťúůýž",
    "da": "æøå",
    "de": "äöüß",
    "eo": "ĉĝĥĵŝŭ",
    "es": "áéíóúñü¿¡",
    "et": "äöõüšž",
    "fr": "àâæçéèêëîïôœùûüÿ",
    "ga": "áéíóú",
    "hr": "čćšžđ",
    "hu": "áéíóöőúüű",
    "is": "áðéíóúýþæö",
    "it": "àèéìíîòóùú",
    "lt": "ąčęėįšųūž",
    "lv": "āčēģīķļņšūž",
    "nb": "æøå",
    "nn": "æøå",
    "pl": "ąćęłńóśźż",
    "pt": "áâãàçéêíóôõú",
    "ro": "ăâîșşțţ",
    "sk": "áäčďéíĺľňóôŕšťúýž",
    "sl": "čšž",
    "sq": "çë",
    "sv": "åäö",
    "tr": "çğıöşü",
    "yo": "ẹọṣàáèéìíòóùú",
}

_SCRIPT_CACHE: dict[str, str | None] = {}


def char_script(ch: str) -> str | None:
    """The script of a letter from its Unicode name (LATIN, CYRILLIC, CJK, ...); None if not a letter."""
    script = _SCRIPT_CACHE.get(ch, "")
    if script != "":
        return script
    script = None
    if ch.isalpha():
        name = unicodedata.name(ch, "")
        first = name.split(" ", 1)[0]
        if first in SCRIPT_LANGUAGES:
            script = first
        elif first == "HANGUL":
            script = "HANGUL"
    _SCRIPT_CACHE[ch] = script
    return script


def candidate_languages(
    text: str, targets: tuple[str, ...], min_letters: int = 200, min_share: float = 0.1
) -> frozenset[str] | None:
    """The lingua languages `text` can be in; None when the test cannot tell (lingua then gets all).

    Scripts holding at least `min_share` of the letters count. Among Latin-script languages, one with
    marker letters needs at least one of them once the text has `min_letters` letters.
    """
    counts: dict[str, int] = {}
    chars: dict[str, int] = {}
    for ch in text:
        chars[ch] = chars.get(ch, 0) + 1
    letters = 0
    for ch, n in chars.items():
        script = char_script(ch)
        if script is not None:
            counts[script] = counts.get(script, 0) + n
            letters += n
    if not letters:
        return None
    present = {ch.lower() for ch in chars}
    candidates: set[str] = set()
    for script, n in counts.items():
        if n < min_share * letters:
            continue
        for lang in SCRIPT_LANGUAGES[script]:
            markers = MARKERS.get(lang)
            if (
                script != "LATIN"
                or markers is None
                or lang in targets
                or letters < min_letters
                or not present.isdisjoint(markers)
            ):
                candidates.add(lang)
    return frozenset(candidates) or None
