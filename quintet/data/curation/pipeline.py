"""Run a curation config as datatrove pipelines: filter stage, then the dedup stages, then statistics.

Output folder:

    curated/<lang>/<rank>.jsonl|parquet   the curated documents: text, id, lang, source, metadata
    dropped/<step>/<rank>.jsonl           dropped documents with metadata.filter_reason (write_dropped)
    dropped/skipped/<input>-<rank>.jsonl  input lines skipped under on_error = "skip": file, line, reason
    stats.json, stats.md, stats.png       kept and dropped per step, per reason, per language
    logs/<stage>/                         datatrove's logs, per-task statistics and completion markers
    work/                                 the filtered documents and dedup signatures between stages
    curation.json                         the config and its fingerprint
    timing.json                           wall-clock seconds of each stage (of the last run)

A run that is killed is resumed by running it again with the same output folder: datatrove skips the tasks
whose completion marker exists and reruns the others from the start, overwriting their partial files, so no
document is written twice. A different config in the same folder is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter, ParquetWriter
from datatrove.pipeline.writers.disk_base import DiskWriter

from quintet.data.curation.base import DocumentProgress, LanguageCounter
from quintet.data.curation.config import CurationConfig, build_step, load_config
from quintet.data.curation.dedup import Stage, dedup_stages
from quintet.data.curation.language import CodeFilter
from quintet.data.curation.readers import (
    CurationInputError,
    JsonlDocumentReader,
    ParquetDocumentReader,
    TextFolderReader,
)
from quintet.data.curation.stats import collect_stats, write_stats
from quintet.errors import ConfigError
from quintet.io import atomic_write_text, output_lock
from quintet.processes import children_die_with_this_process

log = logging.getLogger("quintet.data")

_READERS = {
    "jsonl": JsonlDocumentReader,
    "parquet": ParquetDocumentReader,
    "text": TextFolderReader,
    "code": TextFolderReader,
}


@dataclass
class CurationResult:
    out_dir: Path
    curated_dir: Path
    dropped_dir: Path | None
    stats: dict[str, Any] | None  # None when the stages were submitted to Slurm and still run
    stats_paths: dict[str, Path]


def output_row(self: DiskWriter, document: Document) -> dict[str, Any]:
    """A curated document as written: text, id, lang, source, and the rest of its metadata."""
    meta = dict(document.metadata)
    return {
        "text": document.text,
        "id": document.id,
        "lang": meta.pop("language", None),
        "source": meta.pop("source", None),
        "metadata": meta,
    }


def output_row_parquet(self: DiskWriter, document: Document) -> dict[str, Any]:
    """As `output_row`, with the metadata as a JSON string (a column type every row shares)."""
    row = output_row(self, document)
    row["metadata"] = json.dumps(row["metadata"], ensure_ascii=False, default=str)
    return row


def dropped_row(self: DiskWriter, document: Document) -> dict[str, Any]:
    """A dropped document: as curated, plus the reason (the step's folder name when the step gives none)."""
    row = output_row(self, document)
    row["reason"] = row["metadata"].pop("filter_reason", None) or self.reason
    return row


def _dropped_writer(folder: Path, reason: str) -> JsonlWriter:
    writer = JsonlWriter(str(folder), output_filename="${rank}.jsonl", compression=None, adapter=dropped_row)
    writer.reason = reason
    return writer


def make_readers(config: CurationConfig, skipped_folder: Path | None) -> list[PipelineStep]:
    """One reader per input, chained: each reads its own share of its files in every task."""
    readers = []
    for inp in config.inputs:
        reader = _READERS[inp.type](
            str(inp.path),
            source=inp.name,
            glob_pattern=inp.glob,
            on_error=inp.on_error,
            lang=inp.lang,
            skipped_folder=str(skipped_folder) if skipped_folder else None,
        )
        readers.append(reader)
    return readers


def check_inputs(config: CurationConfig) -> None:
    """Every input folder exists and has files to read; otherwise an error naming the config and folder."""
    where = f"{config.source}: " if config.source else ""
    for inp, reader in zip(config.inputs, make_readers(config, None), strict=True):
        if not inp.path.is_dir():
            raise CurationInputError(f"{where}input {inp.name!r}: folder {inp.path} does not exist")
        if not reader.list_input_files():
            raise CurationInputError(
                f"{where}input {inp.name!r}: no files matching {' or '.join(inp.glob)} in {inp.path}"
            )


def _final_writer(config: CurationConfig, curated: Path) -> DiskWriter:
    compression = None if config.output.compression == "none" else config.output.compression
    if config.output.format == "parquet":
        name = "${language}/${rank}.parquet"
        return ParquetWriter(
            str(curated), output_filename=name, compression=compression, adapter=output_row_parquet
        )
    suffix = {"gzip": ".gz", "zstd": ".zst"}.get(config.output.compression, "")
    name = "${language}/${rank}.jsonl" + suffix
    return JsonlWriter(str(curated), output_filename=name, compression=compression, adapter=output_row)


def build_stages(config: CurationConfig, out_dir: Path) -> list[Stage]:
    """The datatrove pipelines of a curation run, in order."""
    dropped = out_dir / "dropped" if config.output.write_dropped else None
    work = out_dir / "work"
    tasks = config.executor.tasks
    steps = []
    for step in config.filter_steps:
        writer = _dropped_writer(dropped / step.name, step.name) if dropped else None
        steps.append(build_step(step, config.languages, exclusion_writer=writer))
    if not config.code:
        steps.insert(0, _drop_code_step(dropped))
    readers = make_readers(config, dropped / "skipped" if dropped else None)
    readers.append(
        DocumentProgress(str(progress_dir(out_dir, "filter")))
    )  # the long stage: a bar of documents
    final_writer = _final_writer(config, out_dir / "curated")
    settings = config.dedup
    if settings is None:
        return [Stage("filter", [*readers, *steps, LanguageCounter("output", tag=True), final_writer], tasks)]
    filtered = work / "filtered"
    filter_stage = Stage(
        "filter",
        [*readers, *steps, JsonlWriter(str(filtered), output_filename="${rank}.jsonl", compression=None)],
        tasks,
    )

    def reader() -> PipelineStep:
        return JsonlReader(str(filtered), glob_pattern="*.jsonl", add_file_path=False)

    def exclusion(name: str) -> DiskWriter:
        return _dropped_writer(dropped / name, name)

    return [
        filter_stage,
        *dedup_stages(reader, work, settings, tasks, final_writer, exclusion if dropped else None),
    ]


def progress_dir(out_dir: Path, stage: str) -> Path:
    """Where a stage's `DocumentProgress` writes each task's document count."""
    return out_dir / "logs" / stage / "progress"


def _drop_code_step(dropped: Path | None) -> PipelineStep:
    writer = _dropped_writer(dropped / "code", "code") if dropped else None
    return CodeFilter(exclusion_writer=writer)


def make_executors(stages: list[Stage], config: CurationConfig, logs: Path) -> list[Any]:
    """One datatrove executor per stage; on Slurm and Ray each depends on the one before."""
    ex = config.executor
    executors: list[Any] = []
    for stage in stages:
        common = {"tasks": stage.tasks, "logging_dir": str(logs / stage.name), **ex.options}
        if ex.workers is not None:
            common["workers"] = min(ex.workers, stage.tasks)
        if ex.kind == "local":
            from datatrove.executor import LocalPipelineExecutor

            common.setdefault("workers", 1)
            if common["workers"] != 1:
                _preload_workers(common.get("start_method", "forkserver"))
            executors.append(LocalPipelineExecutor(stage.pipeline, **common))
        elif ex.kind == "slurm":
            from datatrove.executor import SlurmPipelineExecutor

            missing = [k for k in ("partition", "time") if k not in ex.options]
            if missing:
                raise ConfigError(f"{config.source}: executor.kind = 'slurm' needs {' and '.join(missing)}")
            depends = executors[-1] if executors else None
            common.setdefault("job_name", f"quintet-{stage.name}")
            executors.append(SlurmPipelineExecutor(stage.pipeline, depends=depends, **common))
        else:
            from datatrove.executor import RayPipelineExecutor

            common.pop("address", None)  # where to connect (`_ray_connection`), not an executor setting
            depends = executors[-1] if executors else None
            executors.append(RayPipelineExecutor(stage.pipeline, depends=depends, **common))
    return executors


@contextlib.contextmanager
def _ray_connection(config: CurationConfig) -> Iterator[None]:
    """Connected to the running Ray cluster: `executor.address`, else $RAY_ADDRESS, else this machine's.

    datatrove's Ray executor expects a connected driver. A connection made here is closed afterwards (the
    cluster keeps running); one the caller made is left as it is.
    """
    where = f"{config.source}: " if config.source else ""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            f"{where}executor.kind = 'ray' needs Ray: pip install 'quintet[ray]' (or ray[default])"
        ) from None
    if ray.is_initialized():
        yield
        return
    address = config.executor.options.get("address") or os.environ.get("RAY_ADDRESS") or "auto"
    host, _, port = address.rpartition(":")
    options: dict[str, Any] = {}
    if address != "auto" and port.isdigit():
        try:  # Ray itself retries an address where nothing listens for minutes
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as err:
            raise ConfigError(
                f"{where}executor.kind = 'ray': no Ray cluster at {address!r} ({err}); start one with "
                "`ray start --head`, or set executor.address (or RAY_ADDRESS) to the head node's host:port"
            ) from None
        if host in ("127.0.0.1", "localhost"):
            options["_node_ip_address"] = "127.0.0.1"  # a head node started on loopback only
    try:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING", **options)
    except ConnectionError as err:
        raise ConfigError(
            f"{where}executor.kind = 'ray': no Ray cluster at {address!r} ({err}); start one with "
            "`ray start --head`, or set executor.address (or RAY_ADDRESS) to the head node's host:port"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


def _preload_workers(start_method: str) -> None:
    """Workers forked from a forkserver that has imported the libraries and built the tokenizers once.

    Takes effect when this process starts its forkserver (the first pool of the first parallel stage);
    later stages and later runs in the same process fork from the same server.
    """
    if start_method == "forkserver":
        import multiprocess

        os.environ["QUINTET_PARENT_PID"] = str(os.getpid())  # read by quintet.die_with_parent
        multiprocess.get_context("forkserver").set_forkserver_preload(
            ["quintet.die_with_parent", "quintet.data.curation.preload"]  # killed with this process
        )


def _claim_output(config: CurationConfig, out_dir: Path) -> None:
    """Refuse to resume a run made with another config; record this one."""
    marker = out_dir / "curation.json"
    fingerprint = config.fingerprint()
    if marker.is_file():
        previous = json.loads(marker.read_text()).get("fingerprint")
        if previous != fingerprint:
            raise ConfigError(
                f"{out_dir}: holds a curation made with another configuration ({previous} != {fingerprint}); "
                "use another output folder, or delete this one to start over"
            )
        return
    record = {"fingerprint": fingerprint, "config_file": str(config.source), "languages": config.languages}
    atomic_write_text(marker, json.dumps(record, indent=2) + "\n")


def curate(
    config: CurationConfig | str | Path,
    out_dir: str | Path,
    data_root: str | Path | None = None,
    quiet: bool = True,
) -> CurationResult:
    """Run the curation `config` describes into `out_dir`, or resume it there; returns paths and statistics.

    With the local and Ray executors the stages run one after another and the statistics are written at
    the end. With Slurm every stage is submitted as a job array depending on the one before, and this
    returns at once (`stats` None): run `curation_report(out_dir)` when the jobs have finished.
    """
    if not isinstance(config, CurationConfig):
        config = load_config(config, data_root=data_root)
    children_die_with_this_process()  # datatrove's Manager and workers die with this process
    out = Path(out_dir)
    check_inputs(config)
    with output_lock(out, "curation"):  # one run at a time in `out`
        return _curate(config, out, quiet)


def _curate(config: CurationConfig, out: Path, quiet: bool) -> CurationResult:
    _claim_output(config, out)
    stages = build_stages(config, out)
    executors = make_executors(stages, config, out / "logs")
    dropped = out / "dropped" if config.output.write_dropped else None
    if config.executor.kind == "slurm":
        executors[-1].run()  # submits every stage, each depending on the one before, and returns
        return CurationResult(out, out / "curated", dropped, None, {})
    if config.executor.kind == "ray":
        with _ray_connection(config):
            executors[-1].run()  # runs the stages it depends on first, then itself
        return curation_report(out, dropped)
    timing: dict[str, float] = {}
    with _quiet_datatrove(quiet):
        for stage, executor in zip(stages, executors, strict=True):
            start = time.perf_counter()
            with _stage_progress(stage, out / "logs" / stage.name, enabled=quiet):
                executor.run()
            timing[stage.name] = round(time.perf_counter() - start, 3)
    atomic_write_text(out / "timing.json", json.dumps({"stage_wall_s": timing}, indent=2) + "\n")
    return curation_report(out, dropped)


def curation_report(out_dir: str | Path, dropped_dir: Path | None = None) -> CurationResult:
    """Collect the statistics of a finished curation in `out_dir` and write stats.json, .md and .png."""
    out = Path(out_dir)
    stats = collect_stats(out)
    paths = write_stats(stats, out)
    dropped = dropped_dir or (out / "dropped" if (out / "dropped").is_dir() else None)
    return CurationResult(out, out / "curated", dropped, stats, paths)


@contextlib.contextmanager
def _stage_progress(stage: Stage, logs: Path, enabled: bool = True) -> Iterator[None]:
    """While a stage runs: which steps it runs, then a bar of its finished tasks (datatrove's completion
    markers, `logs/completions/NNNNN`) and, where the stage counts them (`DocumentProgress`, in the filter
    stage), of the documents read so far, polled twice a second. Off with datatrove's own log lines
    (`--verbose`), which say the same."""
    if not enabled:
        yield
        return
    import threading

    from tqdm import tqdm

    names = ", ".join(step.name for step in stage.pipeline if isinstance(step, PipelineStep))
    log.info("curation stage %s: %d tasks: %s", stage.name, stage.tasks, names)
    counted = any(isinstance(step, DocumentProgress) for step in stage.pipeline)
    done = threading.Event()
    if counted:
        bar = tqdm(desc=f"curate {stage.name}", unit="doc")
    else:
        bar = tqdm(total=stage.tasks, desc=f"curate {stage.name}", unit="task")

    def files(name: str) -> list[Path]:
        folder = logs / name
        return [p for p in folder.iterdir() if not p.name.endswith(".tmp")] if folder.is_dir() else []

    def update() -> None:
        tasks = len(files("completions"))
        if not counted:
            bar.update(tasks - bar.n)
            return
        documents = 0
        for path in files("progress"):
            with contextlib.suppress(OSError, ValueError):
                documents += int(path.read_text() or 0)
        bar.set_postfix_str(f"tasks {tasks}/{stage.tasks}", refresh=False)
        bar.update(documents - bar.n)

    def poll() -> None:
        while not done.wait(0.5):
            update()

    thread = threading.Thread(target=poll, name="curation-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        update()
        bar.close()


@contextlib.contextmanager
def _quiet_datatrove(quiet: bool) -> Iterator[None]:
    """Without datatrove's per-file and per-task INFO lines (our warnings, e.g. skipped lines, still show).

    In this process by disabling datatrove's loguru messages; in worker processes, which import loguru
    afresh, through LOGURU_LEVEL. Both are restored afterwards.
    """
    if not quiet:
        yield
        return
    from loguru import logger

    previous = os.environ.get("LOGURU_LEVEL")
    os.environ.setdefault("LOGURU_LEVEL", "WARNING")
    logger.disable("datatrove")
    try:
        yield
    finally:
        logger.enable("datatrove")
        if previous is None:
            os.environ.pop("LOGURU_LEVEL", None)
