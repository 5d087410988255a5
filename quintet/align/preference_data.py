"""Preference pairs in TRL's JSONL convention: `prompt`, `chosen`, `rejected` per line.

Optional fields carried through: `split` (train / eval), `step` (the sDPO step a pair belongs to),
`source` (for splitting by source), `score` (an external difficulty score), `lang`, `task`, `answer`
(a ground truth a program can check) and `difficulty`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from quintet.io import atomic_path, iter_jsonl

REQUIRED = ("prompt", "chosen", "rejected")
OPTIONAL = ("split", "step", "source", "score", "lang", "task", "answer", "difficulty", "id")


class PreferenceDataError(ValueError):
    """A preference file has a row that cannot be trained on."""


@dataclass
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
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


def parse_pair(row: Any, where: str) -> PreferencePair:
    """Validate one row; errors name `where` (file:line), the field and the value."""
    if not isinstance(row, dict):
        raise PreferenceDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name in REQUIRED:
        if name not in row:
            raise PreferenceDataError(
                f"{where}: missing field {name!r} (each row needs {', '.join(REQUIRED)})"
            )
        if not isinstance(row[name], str):
            raise PreferenceDataError(f"{where}: field {name!r} = {row[name]!r}: must be a string")
    for name in ("chosen", "rejected"):
        if not row[name].strip():
            raise PreferenceDataError(f"{where}: field {name!r} is empty; a response needs text")
    if row["chosen"] == row["rejected"]:
        raise PreferenceDataError(
            f"{where}: chosen == rejected ({row['chosen'][:60]!r}); the pair prefers nothing"
        )
    unknown = sorted(set(row) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise PreferenceDataError(
            f"{where}: unknown field(s) {unknown}; valid: {', '.join(REQUIRED + OPTIONAL)}"
        )
    if "step" in row and (not isinstance(row["step"], int) or row["step"] < 0):
        raise PreferenceDataError(f"{where}: field 'step' = {row['step']!r}: must be an integer >= 0")
    if "score" in row and not isinstance(row["score"], (int, float)):
        raise PreferenceDataError(f"{where}: field 'score' = {row['score']!r}: must be a number")
    return PreferencePair(**row)


def read_preferences(path: str | os.PathLike) -> list[PreferencePair]:
    """All pairs of a JSONL file; the first bad line raises an error naming the file and line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such preference file")
    pairs = [parse_pair(row, where) for where, _, row in iter_jsonl(path, PreferenceDataError)]
    if not pairs:
        raise PreferenceDataError(f"{path}: no preference pairs in the file")
    return pairs


def write_preferences(path: str | os.PathLike, pairs: Iterable[PreferencePair]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair.to_dict(), ensure_ascii=False) + "\n")
