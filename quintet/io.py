"""Files written so that an interrupted run never leaves a half-written output behind."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def iter_jsonl(path: Path, error: type[Exception] = ValueError) -> Iterator[tuple[str, int, object]]:
    """`(where, line_number, row)` for each non-empty line of a JSONL file, `where` = "file:line".

    A line that is not UTF-8 or not JSON raises `error` naming the file, the line and what is wrong.
    """
    with Path(path).open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise error(f"{where}: not UTF-8 ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            try:
                yield where, number, json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{where}: not valid JSON (column {err.colno}): {err.msg}") from None
