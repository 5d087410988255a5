"""Files written so that an interrupted run never leaves a half-written output behind, the one reader
and writer of safetensors weights (quintet never unpickles a file), and the lock that gives one run at a
time an output folder (`output_lock`)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from quintet.errors import CheckpointError, OutputInUseError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed.

    The output gets mode 0o666 less the process's umask, as `open()` creates files, even when the writer
    replaces the temporary file with one of its own (safetensors writes 0600; so does `tempfile.mkstemp`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _create_temporary(path)
    mode = tmp_path.stat().st_mode & 0o777  # what the OS gave a new file under this umask
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _create_temporary(path: Path) -> Path:
    """A new empty file `.NAME.RANDOM.tmp` beside `path` (exclusive create, umask applied by the OS)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{path.parent}: could not create a temporary file for {path.name}")


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


def check_row(
    row: object,
    where: str,
    error: type[Exception] = ValueError,
    required: Sequence[str] = (),
    fields: Sequence[str] | None = None,
    needs: str | None = None,
    null_is_absent: bool = False,
) -> dict[str, Any]:
    """One JSONL row (`where` = "file:line", as `iter_jsonl` gives it) checked as a record of named fields:
    a JSON object, holding every `required` field and, when `fields` lists the valid ones, no other.

    Errors raise `error` naming `where`, the field and what is valid; `needs` says what each row needs in
    the missing-field message (default: the required fields). With `null_is_absent`, fields written as
    null (`dataclasses.asdict` of a record with unset fields) are dropped first. Returns the row.
    """
    if not isinstance(row, dict):
        raise error(f"{where}: expected a JSON object, got {type(row).__name__}")
    if null_is_absent:
        row = {k: v for k, v in row.items() if v is not None}
    for name in required:
        if name not in row:
            raise error(f"{where}: missing field {name!r} (each row needs {needs or ', '.join(required)})")
    if fields is not None:
        unknown = sorted(set(row) - set(fields) - set(required))
        if unknown:
            raise error(f"{where}: unknown field(s) {unknown}; valid: {', '.join(fields)}")
    return row


Record = TypeVar("Record")


def read_records(
    path: str | os.PathLike,
    parse: Callable[[object, str], Record],
    error: type[Exception],
    kind: str,
    items: str,
    unique: str | None = None,
) -> list[Record]:
    """Every row of a JSONL file of `kind` ("preference") through `parse(row, where)`.

    A missing file is a FileNotFoundError, a file without rows an `error` saying it has no `items`
    ("preference pairs"); with `unique` (an attribute of the records, "id"), a value seen on an earlier
    line is an `error` naming both lines.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {kind} file")
    records: list[Record] = []
    seen: dict[Any, int] = {}
    for where, number, row in iter_jsonl(path, error):
        record = parse(row, where)
        if unique is not None:
            key = getattr(record, unique)
            if key in seen:
                raise error(
                    f"{where}: field {unique!r} = {key!r} repeats line {seen[key]}; {unique}s must be unique"
                )
            seen[key] = number
        records.append(record)
    if not records:
        raise error(f"{path}: no {items} in the file")
    return records


# The files that travel with a model besides config.json and its weights: what transformers writes for a
# tokenizer (5.x puts the chat template in chat_template.jinja), and the generation defaults. Every stage
# that writes a model folder from another one copies them with `copy_model_files`.
MODEL_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def copy_model_files(source_dir: str | os.PathLike, target_dir: str | os.PathLike) -> list[str]:
    """Copy the `MODEL_FILES` that `source_dir` has into `target_dir`, each through a temporary name,
    except those the target already holds (the writer's own, e.g. the generation_config.json it saved).
    Returns the names copied."""
    import shutil

    source, target = Path(source_dir), Path(target_dir)
    copied = []
    for name in MODEL_FILES:
        src = source / name
        if src.is_file() and not (target / name).exists():
            with atomic_path(target / name) as tmp:
                shutil.copyfile(src, tmp)
            copied.append(name)
    return copied


# ------------------------------------------------------------------------------------------ safetensors
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def write_safetensors(
    tensors: Mapping, path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write tensors (made contiguous, on the CPU) to a safetensors file through a temporary name."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", **(metadata or {})})


def missing_weights(path: str | os.PathLike) -> CheckpointError:
    """The error for a weights file that is not there, naming any pickle weights beside it (never read)."""
    path = Path(path)
    pickles = sorted(p.name for p in path.parent.glob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        return CheckpointError(
            f"{path}: missing; found only pickle weights {pickles}: quintet reads safetensors only, as "
            "pickles can run code; convert them with a tool you trust"
        )
    return CheckpointError(f"{path}: missing; a model folder holds its weights in {path.name}")


def _corrupt(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path}: not a readable safetensors file ({err}); the file is corrupt or truncated: write it again "
        "or use another copy"
    )


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike, device: str = "cpu") -> Iterator[Any]:
    """`safetensors.safe_open(path)`; a missing file, or a truncated or garbled one (safetensors raises
    `SafetensorError` for every header problem), raises `CheckpointError` naming the file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise missing_weights(path)
    try:
        handle = safe_open(str(path), framework="pt", device=device)
    except SafetensorError as err:
        raise _corrupt(path, err) from None
    with handle as f:
        try:
            yield f
        except SafetensorError as err:
            raise _corrupt(path, err) from None


def read_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict:
    """Every tensor of a safetensors file; a missing, truncated or garbled file raises `CheckpointError`."""
    with open_safetensors(path, device) as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (no __iter__)


def tensor_mismatches(
    expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]], optional: Sequence[str] = ()
) -> list[str]:
    """One line per tensor that is missing, unexpected (unless in `optional`) or of the wrong shape."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - set(optional))
    lines = [f"  missing tensor: {k} (expected shape {list(expected[k])})" for k in missing]
    lines += [f"  unexpected tensor: {k} (shape {list(found[k])})" for k in unexpected]
    lines += [
        f"  wrong shape: {k}: found {list(found[k])}, expected {list(expected[k])}"
        for k in sorted(set(expected) & set(found))
        if tuple(expected[k]) != tuple(found[k])
    ]
    return lines


# ------------------------------------------------------------------------------------------ output lock
LOCK_NAME = ".quintet.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _lock_holder(fd: int) -> tuple[int | None, str]:
    """(PID, host) written in a lock file, (None, "") when it holds none."""
    parts = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
    if not parts or not parts[0].isdigit():
        return None, ""
    return int(parts[0]), parts[1] if len(parts) > 1 else ""


@contextlib.contextmanager
def output_lock(out_dir: str | os.PathLike, what: str = "run") -> Iterator[Path]:
    """Hold an exclusive lock on the output folder `out_dir` while the block runs.

    `fcntl.flock` on `out_dir/.quintet.lock`, which holds the holder's PID and host. A second process
    asking for the same folder gets `OutputInUseError` naming that PID. The kernel drops the lock of a
    process that died (even by kill -9), so a lock file left by a dead run is simply taken over (with a
    warning naming the dead PID). Used by every command that writes a run folder: `train lm`, `train
    vision`, `align sft|dpo|sdpo` and `data curate`."""
    import fcntl
    import logging
    import socket

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, host = _lock_holder(fd)
            holder = f"PID {pid}" + (f" on {host}" if host else "") if pid is not None else "a process"
            if pid is not None and host == socket.gethostname() and not _pid_alive(pid):
                holder += " (exited; processes it started still hold the lock)"
            raise OutputInUseError(
                f"{folder}: in use by another {what} ({holder}, lock file {path}); wait for it to finish or "
                "stop it, or choose another output folder"
            ) from None
        pid, host = _lock_holder(fd)
        if pid is not None and pid != os.getpid():
            where = f" on {host}" if host else ""
            logging.getLogger("quintet.io").warning(
                "%s: taking over the lock of PID %d%s, which has exited", folder, pid, where
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # released: the file stays (removing it would race a process opening it)
    finally:
        os.close(fd)  # closing the descriptor releases the lock
