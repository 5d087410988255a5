"""Token shards: curated documents as flat uint16/uint32 token files and a JSON index (nanoGPT, Megatron).

    <out>/index.json                      what is where (below)
    <out>/tokenizer.json                  a copy of the tokenizer the shards were made with
    <out>/<source>/<split>-00000.bin      token ids, little-endian uint16 (vocab <= 65536) or uint32
    <out>/<source>/<split>-00000.idx      document boundaries: little-endian uint64 offsets, N + 1 of them

A source is a named stream (by default one per curated language folder: en, fi, hi, ja, vi, code); each has
a `train` and a `heldout` split. Every document is its tokens followed by the end-of-sequence id, so
`decode(tokens[b[i] : b[i+1] - 1]) == text` for document i. The held-out split takes the documents whose
SHA-256 of id falls in the lowest `heldout_fraction` of the hash range (at least `min_heldout_documents`
per source when the source has more documents than that), so it is stable however the corpus is sharded.

index.json:

    {"format": "quintet-token-shards", "version": 1, "dtype": "uint16",
     "tokenizer": {"file": "tokenizer.json", "sha256": "...", "vocab_size": 4096,
                   "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
     "document_end": "eos",
     "heldout": {"fraction": 0.05, "min_documents": 1, "rule": "..."},
     "sources": {"en": {"train": {"tokens": 123, "documents": 4,
                                  "files": [{"path": "en/train-00000.bin", "boundaries": "en/train-00000.idx",
                                             "tokens": 123, "documents": 4}]},
                        "heldout": {...}}}}
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quintet.data.tokenizer_training import EOS, jsonl_rows, tokenizer_sha256
from quintet.io import atomic_path, atomic_write_text

FORMAT, VERSION = "quintet-token-shards", 1
SPLITS = ("train", "heldout")
_HASH_SPACE = 2**64


class ShardError(ValueError):
    """An index or shard that is missing, inconsistent or made with another tokenizer."""


def _id_hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")


def _source_documents(folder: Path) -> Iterator[tuple[str, str]]:
    """(id, text) of every curated document in a source folder, in file order."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    for path in files:
        if path.name.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(path, columns=["id", "text"])
            yield from zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True)
        elif path.name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
            for row in jsonl_rows(path):
                yield str(row["id"]), row["text"]


class _ShardWriter:
    """Appends documents to `<source>/<split>-NNNNN.bin/.idx`, starting a new file every `shard_tokens`."""

    def __init__(self, out: Path, source: str, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.source, self.split, self.dtype, self.shard_tokens = (
            out,
            source,
            split,
            dtype,
            shard_tokens,
        )
        self.files: list[dict[str, Any]] = []
        self._tokens: list[np.ndarray] = []
        self._offsets: list[int] = [0]

    def add(self, ids: list[int]) -> None:
        self._tokens.append(np.asarray(ids, dtype=self.dtype))
        self._offsets.append(self._offsets[-1] + len(ids))
        if self._offsets[-1] >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if len(self._offsets) == 1:
            return
        stem = f"{self.source}/{self.split}-{len(self.files):05d}"
        with atomic_path(self.out / f"{stem}.bin") as tmp:
            np.concatenate(self._tokens).astype(self.dtype.newbyteorder("<"), copy=False).tofile(tmp)
        with atomic_path(self.out / f"{stem}.idx") as tmp:
            np.asarray(self._offsets, dtype="<u8").tofile(tmp)
        self.files.append(
            {
                "path": f"{stem}.bin",
                "boundaries": f"{stem}.idx",
                "tokens": self._offsets[-1],
                "documents": len(self._offsets) - 1,
            }
        )
        self._tokens, self._offsets = [], [0]

    def summary(self) -> dict[str, Any]:
        self.flush()
        return {
            "tokens": sum(f["tokens"] for f in self.files),
            "documents": sum(f["documents"] for f in self.files),
            "files": self.files,
        }


def tokenize_curated(
    curated_dir: str | os.PathLike,
    tokenizer: str | os.PathLike,
    out_dir: str | os.PathLike,
    sources: list[str] | None = None,
    heldout_fraction: float = 0.05,
    min_heldout_documents: int = 1,
    shard_tokens: int = 1 << 26,
    batch_size: int = 512,
) -> Path:
    """Tokenize a curated folder (`<lang>/...jsonl|parquet`) into token shards; returns index.json's path.

    `tokenizer` is a tokenizer.json or a folder holding one. `sources` (default: every subfolder) are the
    names of the curated subfolders to tokenize, each becoming a source of the same name.
    """
    from tokenizers import Tokenizer

    curated = Path(curated_dir)
    tok_path = Path(tokenizer)
    if tok_path.is_dir():
        tok_path = tok_path / "tokenizer.json"
    if not tok_path.is_file():
        raise FileNotFoundError(f"{tok_path}: no tokenizer.json (train one with `quintet data tokenizer`)")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction = {heldout_fraction}: must be in [0, 1)")
    available = sorted(p.name for p in curated.iterdir() if p.is_dir()) if curated.is_dir() else []
    if not available:
        raise FileNotFoundError(f"{curated}: no source folders (expected curated/<lang>/...)")
    sources = sources or available
    unknown = [s for s in sources if s not in available]
    if unknown:
        raise ValueError(f"sources {unknown}: not folders of {curated}; available: {', '.join(available)}")

    tok = Tokenizer.from_file(str(tok_path))
    tok.encode_special_tokens = True  # a literal "<|eos|>" in a document is text, not the special token
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise ShardError(f"{tok_path}: has no {EOS} token (train it with quintet.data.tokenizer_training)")
    dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "tokenizer": {
            "file": "tokenizer.json",
            "sha256": tokenizer_sha256(tok_path),
            "vocab_size": vocab_size,
            "pad_token_id": tok.token_to_id("<|pad|>"),
            "bos_token_id": tok.token_to_id("<|bos|>"),
            "eos_token_id": eos,
        },
        "document_end": "eos",
        "heldout": {
            "fraction": heldout_fraction,
            "min_documents": min_heldout_documents,
            "rule": "sha256(id) first 8 bytes / 2**64 < fraction, or among the lowest min_documents",
        },
        "curated": str(curated),
        "sources": {},
    }
    for source in sources:
        folder = curated / source
        hashes = sorted(_id_hash(doc_id) for doc_id, _ in _source_documents(folder))
        cutoff = int(heldout_fraction * _HASH_SPACE)
        if len(hashes) > min_heldout_documents:
            cutoff = max(cutoff, hashes[min_heldout_documents - 1] + 1) if min_heldout_documents else cutoff
        else:
            cutoff = 0  # too few documents: all train
        writers = {split: _ShardWriter(out, source, split, dtype, shard_tokens) for split in SPLITS}
        batch: list[tuple[str, str]] = []
        for item in _source_documents(folder):
            batch.append(item)
            if len(batch) >= batch_size:
                _encode_batch(tok, batch, eos, cutoff, writers)
                batch = []
        _encode_batch(tok, batch, eos, cutoff, writers)
        index["sources"][source] = {split: w.summary() for split, w in writers.items()}
    if tok_path.resolve() != (out / "tokenizer.json").resolve():
        with atomic_path(out / "tokenizer.json") as tmp:
            shutil.copyfile(tok_path, tmp)
    atomic_write_text(out / "index.json", json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    return out / "index.json"


def _encode_batch(tok: Any, batch: list[tuple[str, str]], eos: int, cutoff: int, writers: dict) -> None:
    if not batch:
        return
    encodings = tok.encode_batch([text for _, text in batch], add_special_tokens=False)
    for (doc_id, _), enc in zip(batch, encodings, strict=True):
        split = "heldout" if _id_hash(doc_id) < cutoff else "train"
        writers[split].add([*enc.ids, eos])


# ------------------------------------------------------------------------------------------------ reading
def resolve_index(index_or_dir: str | os.PathLike) -> Path:
    path = Path(index_or_dir)
    if path.is_dir():
        path = path / "index.json"
    if not path.is_file():
        raise ShardError(f"{path}: no token shard index (make one with `quintet data tokenize`)")
    return path


def load_index(index_or_dir: str | os.PathLike) -> dict[str, Any]:
    """A shard index, checked: format, version, and every file present with the size it claims."""
    path = resolve_index(index_or_dir)
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ShardError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ShardError(
            f"{path}: format {index.get('format')!r} version {index.get('version')!r}; "
            f"expected {FORMAT!r} version {VERSION}"
        )
    itemsize = np.dtype(index["dtype"]).itemsize
    for source, splits in index["sources"].items():
        for split, info in splits.items():
            for f in info["files"]:
                bin_path = path.parent / f["path"]
                if not bin_path.is_file() or bin_path.stat().st_size != f["tokens"] * itemsize:
                    size = bin_path.stat().st_size if bin_path.is_file() else "missing"
                    raise ShardError(
                        f"{bin_path}: {size} bytes, the index ({source}/{split}) says "
                        f"{f['tokens']} tokens x {itemsize} bytes"
                    )
                check_boundaries(path.parent / f["boundaries"], f["documents"], f["tokens"])
    index["root"] = str(path.parent)
    return index


def check_boundaries(idx_path: Path, documents: int, tokens: int) -> np.ndarray:
    """A shard's document offsets, checked: `documents + 1` of them, from 0 to `tokens`, each document at
    least one token (its end-of-sequence id) long. A corrupt offset would silently drop or merge
    documents; the error names the file and the first bad offset."""
    if not idx_path.is_file() or idx_path.stat().st_size != (documents + 1) * 8:
        size = idx_path.stat().st_size if idx_path.is_file() else "missing"
        raise ShardError(
            f"{idx_path}: {size} bytes, the index says {documents} documents "
            f"({documents + 1} offsets x 8 bytes)"
        )
    bounds = np.fromfile(idx_path, dtype="<u8")
    if int(bounds[0]) != 0:
        raise ShardError(f"{idx_path}: offset 0 is {int(bounds[0])}, must be 0 (the first document's start)")
    steps = np.diff(bounds.astype(np.int64))
    bad = np.flatnonzero(steps < 1)
    if bad.size:
        i = int(bad[0]) + 1
        raise ShardError(
            f"{idx_path}: offset {i} is {int(bounds[i])}, not past offset {i - 1} ({int(bounds[i - 1])}): "
            "corrupt document boundaries (every document holds at least its end-of-sequence id)"
        )
    if int(bounds[-1]) != tokens:
        raise ShardError(
            f"{idx_path}: last offset {int(bounds[-1])}, but the shard holds {tokens} tokens (index.json)"
        )
    return bounds


def check_token_ids(tokens: np.ndarray, vocab_size: int, where: Path, start: int = 0) -> None:
    """Every id in `tokens` (read from `where` at token offset `start`) below the shards' `vocab_size`."""
    if tokens.size and int(tokens.max()) >= vocab_size:
        i = int(np.flatnonzero(tokens >= vocab_size)[0])
        raise ShardError(
            f"{where}: token {start + i} is id {int(tokens[i])}, outside the shards' tokenizer "
            f"(vocab_size {vocab_size}, index.json): a corrupt shard"
        )


@dataclass
class TokenStream:
    """One source's split as one token sequence over its files (memory-mapped, read on demand)."""

    files: list[np.memmap]
    starts: np.ndarray  # cumulative token offsets of the files, with the total last
    paths: list[Path] | None = None  # the files' paths, for error messages
    vocab_size: int | None = None  # ids read must be below it (the shards' tokenizer)

    @classmethod
    def open(cls, index: dict[str, Any], source: str, split: str = "train") -> TokenStream:
        root = Path(index["root"])
        if source not in index["sources"]:
            raise ShardError(f"{root}: no source {source!r}; sources: {', '.join(index['sources'])}")
        info = index["sources"][source].get(split)
        if info is None:
            raise ShardError(f"{root}: source {source!r} has no {split!r} split")
        dtype = np.dtype(index["dtype"]).newbyteorder("<")
        paths = [root / f["path"] for f in info["files"] if f["tokens"]]
        files = [np.memmap(p, dtype=dtype, mode="r") for p in paths]
        starts = np.cumsum([0] + [len(f) for f in files])
        return cls(files, starts, paths, index["tokenizer"].get("vocab_size"))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, across file boundaries."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) outside [0, {len(self)})")
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        while filled < length:
            i = int(np.searchsorted(self.starts, pos, side="right") - 1)
            local = pos - int(self.starts[i])
            take = min(length - filled, len(self.files[i]) - local)
            out[filled : filled + take] = self.files[i][local : local + take]
            if self.vocab_size is not None:  # a corrupt id would index past the embedding, or train garbage
                where = self.paths[i] if self.paths else Path(f"file {i}")
                check_token_ids(out[filled : filled + take], self.vocab_size, where, local)
            filled += take
            pos += take
        return out


def iter_documents(
    index_or_dir: str | os.PathLike | dict, source: str, split: str = "train"
) -> Iterator[np.ndarray]:
    """Each document's tokens (without the end-of-sequence id), in order."""
    index = index_or_dir if isinstance(index_or_dir, dict) else load_index(index_or_dir)
    root = Path(index["root"])
    dtype = np.dtype(index["dtype"]).newbyteorder("<")
    vocab_size, eos = index["tokenizer"].get("vocab_size"), index["tokenizer"].get("eos_token_id")
    for f in index["sources"][source][split]["files"]:
        tokens = np.fromfile(root / f["path"], dtype=dtype)
        bounds = check_boundaries(root / f["boundaries"], f["documents"], len(tokens))
        if vocab_size is not None:
            check_token_ids(tokens, vocab_size, root / f["path"])
        if eos is not None and index.get("document_end") == "eos" and len(bounds) > 1:
            ends = bounds[1:].astype(np.int64) - 1
            wrong = np.flatnonzero(tokens[ends] != eos)
            if wrong.size:
                d = int(wrong[0])
                raise ShardError(
                    f"{root / f['boundaries']}: offset {d + 1} is {int(bounds[d + 1])}, but token "
                    f"{int(ends[d])} of {f['path']} is id {int(tokens[ends[d]])}, not the end-of-sequence id "
                    f"{eos}: corrupt document boundaries"
                )
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            yield tokens[int(a) : int(b) - 1].astype(np.int64)
