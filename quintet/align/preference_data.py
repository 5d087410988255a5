"""Preference pairs in TRL's JSONL convention: `prompt`, `chosen`, `rejected` per line.

As TRL's `DPOTrainer` accepts them: all three strings, or all three conversations (lists of
`{"role", "content"}` messages: the prompt's turns, then the chosen and the rejected answer turns); without
`prompt`, chosen and rejected hold the whole exchange and the prompt is their common beginning (TRL's
`extract_prompt`). A field written as null (`dataclasses.asdict` of a `PreferencePair`) counts as absent.

Optional fields carried through: `split` (train / eval), `step` (the sDPO step a pair belongs to),
`source` (for splitting by source), `score` (an external difficulty score), `lang`, `task`, `answer`
(a ground truth a program can check) and `difficulty`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from quintet.chat import check_messages
from quintet.io import atomic_path, check_row, read_records

REQUIRED = ("prompt", "chosen", "rejected")
OPTIONAL = ("split", "step", "source", "score", "lang", "task", "answer", "difficulty", "id")


class PreferenceDataError(ValueError):
    """A preference file has a row that cannot be trained on."""


Text = str | list[dict[str, str]]  # a string, or a conversation (TRL's conversational format)


@dataclass
class PreferencePair:
    prompt: Text
    chosen: Text
    rejected: Text
    split: str | None = None
    step: int | None = None
    source: str | None = None
    score: float | None = None
    lang: str | None = None
    task: str | None = None
    answer: str | None = None
    difficulty: str | None = None
    id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def extract_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """(prompt, chosen, rejected) from two whole exchanges: the prompt is their longest common beginning
    (turns of a conversation, characters of a string, less a space just before the split), as TRL's
    `extract_prompt`."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _check_text(row: dict, name: str, where: str, conversational: bool) -> None:
    value = row[name]
    if conversational:
        try:
            check_messages(value)
        except ValueError as err:
            raise PreferenceDataError(f"{where}: field {name!r}: {err}") from None
        if not value and name != "prompt":
            raise PreferenceDataError(
                f"{where}: field {name!r} is an empty conversation; a response needs a turn"
            )
    elif not isinstance(value, str):
        raise PreferenceDataError(
            f"{where}: field {name!r} = {str(value)[:60]!r}: must be a string (or, for every one of prompt, "
            "chosen and rejected, a list of {role, content} messages)"
        )


def parse_pair(row: Any, where: str) -> PreferencePair:
    """Validate one row; errors name `where` (file:line), the field and the value."""
    row = check_row(
        row,
        where,
        PreferenceDataError,
        required=("chosen", "rejected"),
        fields=REQUIRED + OPTIONAL,
        needs=f"{', '.join(REQUIRED)}; prompt may be left out when chosen and rejected hold the whole "
        "exchange",
        null_is_absent=True,
    )
    conversational = isinstance(row["chosen"], list)
    for name in REQUIRED:
        if name in row:
            _check_text(row, name, where, conversational)
    if "prompt" not in row:
        row["prompt"], row["chosen"], row["rejected"] = extract_prompt(row["chosen"], row["rejected"])
    for name in ("chosen", "rejected"):
        if not conversational and not row[name].strip():
            raise PreferenceDataError(f"{where}: field {name!r} is empty; a response needs text")
    if row["chosen"] == row["rejected"]:
        raise PreferenceDataError(
            f"{where}: chosen == rejected ({str(row['chosen'])[:60]!r}); the pair prefers nothing"
        )
    if "step" in row and (
        not isinstance(row["step"], int) or isinstance(row["step"], bool) or row["step"] < 0
    ):
        raise PreferenceDataError(f"{where}: field 'step' = {row['step']!r}: must be an integer >= 0")
    if "score" in row and (not isinstance(row["score"], (int, float)) or isinstance(row["score"], bool)):
        raise PreferenceDataError(f"{where}: field 'score' = {row['score']!r}: must be a number")
    return PreferencePair(**row)


def read_preferences(path: str | os.PathLike) -> list[PreferencePair]:
    """All pairs of a JSONL file; the first bad line raises an error naming the file and line number."""
    return read_records(path, parse_pair, PreferenceDataError, "preference", "preference pairs")


def write_preferences(path: str | os.PathLike, pairs: Iterable[PreferencePair]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair.to_dict(), ensure_ascii=False) + "\n")
