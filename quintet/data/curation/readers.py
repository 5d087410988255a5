"""Readers: JSONL, Parquet, and folders of text or source files, as datatrove reader steps.

datatrove's own readers log and skip a malformed line; ours either stop with an error that names the file
and the line (`on_error="raise"`, the default) or skip it and count it (`on_error="skip"`): the count is a
reader statistic `skipped_<reason>`, each skipped line is logged with its file and line, and, when the
pipeline writes dropped documents aside, recorded in `dropped/skipped/<rank>.jsonl`. Nothing is dropped
silently.

Every document gets `metadata["source"]` (the input's name) and `metadata["declared_lang"]` (the row's
language field, the folder's language, or "code" for source files); the language step decides the real one.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from typing import Any, Literal

from datatrove.data import Document, DocumentsPipeline
from datatrove.io import DataFolderLike, get_datafolder
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.utils.logging import logger

from quintet.data.curation.base import CODE

OnError = Literal["raise", "skip"]
ON_ERROR_CHOICES = ("raise", "skip")

# File extensions read as source code by the "code" reader, and the language each names.
CODE_EXTENSIONS = {
    ".py": "python",
    ".pyi": "python",
    ".c": "c",
    ".h": "c",
    ".cc": "cpp",
    ".cpp": "cpp",
    ".hpp": "cpp",
    ".rs": "rust",
    ".go": "go",
    ".java": "java",
    ".js": "javascript",
    ".ts": "typescript",
    ".sh": "shell",
    ".rb": "ruby",
    ".jl": "julia",
    ".scala": "scala",
    ".kt": "kotlin",
    ".swift": "swift",
    ".sql": "sql",
}


class CurationInputError(ValueError):
    """A problem with an input file; the message names the file and, where there is one, the line."""


class _QuintetReader(BaseDiskReader):
    """Shared parts: on_error handling, the skipped-lines log, the source and declared-language metadata."""

    def __init__(
        self,
        data_folder: DataFolderLike,
        source: str,
        glob_pattern: str | list[str],
        on_error: OnError = "raise",
        lang: str | None = None,
        skipped_folder: DataFolderLike | None = None,
    ):
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error = {on_error!r}: valid are {', '.join(ON_ERROR_CHOICES)}")
        self.name = f"read:{source}"  # before PipelineStep.__init__, which names the stats after it
        super().__init__(data_folder, add_file_path=False)
        self.patterns = [glob_pattern] if isinstance(glob_pattern, str) else list(glob_pattern)
        self.source = source
        self.on_error = on_error
        self.lang = lang
        self.skipped_folder = get_datafolder(skipped_folder) if skipped_folder else None
        self._skipped_file = None
        self._rank = 0

    def _problem(self, filepath: str, line: int | None, reason: str, detail: str) -> None:
        where = f"{self.data_folder.resolve_paths(filepath)}" + (f":{line}" if line else "")
        if self.on_error == "raise":
            raise CurationInputError(
                f'{where}: {detail} (input {self.source!r}; fix the input, or set on_error = "skip" for this '
                "input to skip and count such lines)"
            )
        self.stat_update(f"skipped_{reason}")
        logger.warning(f"{where}: skipped, {detail}")
        if self.skipped_folder is not None:
            if self._skipped_file is None:
                self._skipped_file = self.skipped_folder.open(f"{self.source}-{self._rank:05d}.jsonl", "wt")
            record = {
                "file": where.rsplit(":", 1)[0] if line else where,
                "line": line,
                "reason": reason,
                "detail": detail,
                "input": self.source,
            }
            self._skipped_file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def _document(
        self, text: Any, doc_id: Any, filepath: str, line: int | None, extra: dict
    ) -> Document | None:
        if not isinstance(text, str) or not text.strip():
            found = "missing" if text is None else f"{type(text).__name__} {str(text)[:40]!r}"
            self._problem(filepath, line, "empty_text", f"field 'text' is {found}; expected non-empty text")
            return None
        if doc_id is None or doc_id == "":
            doc_id = f"{filepath}:{line}" if line else filepath
        metadata = {k: v for k, v in extra.items() if v is not None}
        metadata["source"] = self.source
        declared = self.lang or metadata.pop("lang", None)
        if declared:
            metadata["declared_lang"] = str(declared)
        return Document(text=text, id=str(doc_id), metadata=metadata)

    def list_input_files(self) -> list[str]:
        """This input's files (relative to its folder), sorted; every task sees the same list."""
        files: set[str] = set()
        for pattern in self.patterns:
            files.update(self.data_folder.list_files(glob_pattern=pattern))
        return sorted(files)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        self._rank = rank
        shard = self.list_input_files()[rank::world_size]
        if not shard:
            logger.warning(f"input {self.source!r}: no files for task {rank} of {world_size}")
        try:
            for doc in self.read_files_shard(shard):
                self.update_doc_stats(doc)
                yield doc
        finally:
            if self._skipped_file is not None:
                self._skipped_file.close()
                self._skipped_file = None


class JsonlDocumentReader(_QuintetReader):
    """One document per line: `text`, optional `id`, `lang`; other fields go to metadata."""

    def __init__(
        self, data_folder: DataFolderLike, source: str, glob_pattern: str = "**/*.jsonl", **kwargs: Any
    ):
        super().__init__(data_folder, source, glob_pattern, **kwargs)

    def read_file(self, filepath: str) -> Iterator[Document]:
        with self.data_folder.open(filepath, "rb", compression="infer") as f:
            for line_no, raw in enumerate(f, start=1):
                with self.track_time():
                    doc = self._parse_line(raw, filepath, line_no)
                if doc is not None:
                    yield doc

    def _parse_line(self, raw: bytes, filepath: str, line_no: int) -> Document | None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            detail = f"not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1})"
            self._problem(filepath, line_no, "not_utf8", detail)
            return None
        if not line.strip():
            return None
        try:
            row = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as err:
            self._problem(
                filepath, line_no, "malformed_json", f"malformed JSON, column {err.colno}: {err.msg}"
            )
            return None
        if not isinstance(row, dict):
            detail = f"a JSON {type(row).__name__}, expected an object with a 'text' field"
            self._problem(filepath, line_no, "not_an_object", detail)
            return None
        text, doc_id = row.pop("text", None), row.pop("id", None)
        meta = row.pop("metadata", None)
        return self._document(
            text, doc_id, filepath, line_no, {**(meta if isinstance(meta, dict) else {}), **row}
        )


class ParquetDocumentReader(_QuintetReader):
    """One document per row: a `text` column, optional `id`, `lang`; other columns go to metadata."""

    def __init__(
        self,
        data_folder: DataFolderLike,
        source: str,
        glob_pattern: str = "**/*.parquet",
        batch_size: int = 1000,
        **kwargs: Any,
    ):
        super().__init__(data_folder, source, glob_pattern, **kwargs)
        self.batch_size = batch_size

    def read_file(self, filepath: str) -> Iterator[Document]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        where = self.data_folder.resolve_paths(filepath)
        with self.data_folder.open(filepath, "rb") as f:
            try:
                parquet = pq.ParquetFile(f)
            except (pa.ArrowInvalid, OSError) as err:
                raise CurationInputError(f"{where}: not a readable Parquet file ({err})") from None
            columns = parquet.schema_arrow.names
            if "text" not in columns:
                raise CurationInputError(f"{where}: no 'text' column (columns: {', '.join(columns)})")
            row_no = 0
            for batch in parquet.iter_batches(batch_size=self.batch_size):
                with self.track_time():
                    docs = []
                    for row in batch.to_pylist():
                        row_no += 1
                        text, doc_id = row.pop("text", None), row.pop("id", None)
                        docs.append(self._document(text, doc_id, filepath, row_no, row))
                yield from (doc for doc in docs if doc is not None)


class TextFolderReader(_QuintetReader):
    """One document per file; its id is the path relative to the folder.

    With `lang="code"` (the "code" input type), files are source code: `metadata["code_language"]` is taken
    from the extension.
    """

    def __init__(
        self,
        data_folder: DataFolderLike,
        source: str,
        glob_pattern: str | list[str] = "**/*.txt",
        **kwargs: Any,
    ):
        super().__init__(data_folder, source, glob_pattern, **kwargs)

    def read_file(self, filepath: str) -> Iterator[Document]:
        with self.track_time():
            doc = self._read_one(filepath)
        if doc is not None:
            yield doc

    def _read_one(self, filepath: str) -> Document | None:
        with self.data_folder.open(filepath, "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
            self._problem(
                filepath, line, "not_utf8", f"not UTF-8 (byte {data[err.start]:#04x} at column {column})"
            )
            return None
        extra: dict[str, Any] = {}
        if self.lang == CODE:
            extra["code_language"] = CODE_EXTENSIONS.get(posixpath.splitext(filepath)[1].lower(), "unknown")
        return self._document(text, filepath, filepath, None, extra)
