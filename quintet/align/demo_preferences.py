"""Preference pairs with a ground truth a program can check, in English, Finnish, Hindi, Japanese and
Vietnamese, written from templates by the project.

Tasks: addition, multiplication, kilometre-to-metre conversion. `chosen` states the right number;
`rejected` a wrong one. The easy part's wrong answers are far off (an order of magnitude); the hard
part's are subtly wrong (off by one or by ten, or a dropped zero in conversions). `answer_is_correct`
checks any generated text against the ground truth, for win rates of generations.
"""

from __future__ import annotations

import random
import re

from quintet.align.preference_data import PreferencePair

LANGS = ("en", "fi", "hi", "ja", "vi")

# (question, answer) templates per task and language; {a} {b} operands, {c} the result.
TEMPLATES: dict[str, dict[str, tuple[str, str]]] = {
    "add": {
        "en": ("What is {a} plus {b}?", "{a} plus {b} is {c}."),
        "fi": ("Paljonko on {a} plus {b}?", "{a} plus {b} on {c}."),
        "hi": ("{a} और {b} का योग क्या है?", "{a} और {b} का योग {c} है।"),
        "ja": ("{a}たす{b}はいくつですか？", "{a}たす{b}は{c}です。"),
        "vi": ("{a} cộng {b} bằng bao nhiêu?", "{a} cộng {b} bằng {c}."),
    },
    "mul": {
        "en": ("What is {a} times {b}?", "{a} times {b} is {c}."),
        "fi": ("Paljonko on {a} kertaa {b}?", "{a} kertaa {b} on {c}."),
        "hi": ("{a} गुणा {b} कितना होता है?", "{a} गुणा {b} {c} होता है।"),
        "ja": ("{a}かける{b}はいくつですか？", "{a}かける{b}は{c}です。"),
        "vi": ("{a} nhân {b} bằng bao nhiêu?", "{a} nhân {b} bằng {c}."),
    },
    "km_to_m": {
        "en": ("How many metres are in {a} kilometres?", "{a} kilometres are {c} metres."),
        "fi": ("Montako metriä on {a} kilometrissä?", "{a} kilometrissä on {c} metriä."),
        "hi": ("{a} किलोमीटर में कितने मीटर होते हैं?", "{a} किलोमीटर में {c} मीटर होते हैं।"),
        "ja": ("{a}キロメートルは何メートルですか？", "{a}キロメートルは{c}メートルです。"),
        "vi": ("{a} ki-lô-mét bằng bao nhiêu mét?", "{a} ki-lô-mét bằng {c} mét."),
    },
}


def _operands(task: str, rng: random.Random) -> tuple[int, int, int]:
    if task == "add":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return a, b, a + b
    if task == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return a, b, a * b
    a = rng.randint(1, 30)
    return a, 0, a * 1000


def _wrong(task: str, c: int, hard: bool, rng: random.Random) -> int:
    if hard:
        options = [c + 1, c - 1, c + 10, c - 10] if task != "km_to_m" else [c // 10, c * 10, c + 100]
    else:
        options = [c * 10 + rng.randint(1, 9), c + rng.randint(200, 900), max(1, c // 7 - 3)]
    return rng.choice([o for o in options if o != c and o > 0])


def make_demo_preferences(
    per_cell: int = 20, seed: int = 0, eval_fraction: float = 0.2
) -> list[PreferencePair]:
    """`per_cell` pairs per (task, language, difficulty); the eval split is a disjoint set of questions."""
    rng = random.Random(seed)
    pairs: list[PreferencePair] = []
    seen: set[tuple[str, str, int, int]] = set()
    for task, by_lang in TEMPLATES.items():
        for lang in LANGS:
            question, answer = by_lang[lang]
            for difficulty in ("easy", "hard"):
                made = 0
                while made < per_cell:
                    a, b, c = _operands(task, rng)
                    if (task, lang, a, b) in seen:
                        continue
                    seen.add((task, lang, a, b))
                    wrong = _wrong(task, c, difficulty == "hard", rng)
                    split = "eval" if rng.random() < eval_fraction else "train"
                    pairs.append(
                        PreferencePair(
                            prompt=question.format(a=a, b=b),
                            chosen=answer.format(a=a, b=b, c=c),
                            rejected=answer.format(a=a, b=b, c=wrong),
                            split=split,
                            source=f"{task}-{difficulty}",
                            lang=lang,
                            task=task,
                            answer=str(c),
                            difficulty=difficulty,
                            id=f"{task}-{lang}-{a}-{b}",
                        )
                    )
                    made += 1
    return pairs


_NUMBER = re.compile(r"\d+")


def answer_is_correct(text: str, answer: str) -> bool:
    """True when the last number in `text` is the ground-truth `answer`."""
    numbers = _NUMBER.findall(text)
    return bool(numbers) and numbers[-1] == answer
