"""Curation throughput: the whole pipeline per layout, each step, and the quality step against datatrove's.

    python benchmarks/curation.py --size 100MB [--layouts 1x1 2x2] [--threads 1]
                                  [--out runs/benchmarks/curation.json]

Corpus: the demo corpus generator (`quintet.data.demo_corpus`) run in parts of --part-scale times the demo
counts (scale 1: 593 documents, 0.83 MB), each part with its own seed, until the text reaches --size; the
parts are separate files, so tasks get equal shares. The config is configs/curation-demo.toml (numbers,
language, quality, toxicity, pii, exact + MinHash dedup).

1. Whole pipeline, for each --layouts entry TASKSxWORKERS on datatrove's local executor: wall clock from the
   first stage to the statistics, documents/s and MB/s in all and per core (divided by the workers), the
   machine's 1-minute load average before and after.
2. Per step (first layout): each step's own time as datatrove measures it (time_stats, summed over
   tasks: seconds of one core), with the documents and bytes that entered it.
3. Quality step against datatrove: the same documents (those that pass numbers and language) go through
   datatrove's Gopher repetition, Gopher quality, C4 and FineWeb filters as they ship (each tokenizing for
   itself) and through quintet's quality step, interleaved document by document in one process
   (--compare-block N: N documents through one, then the same N through the other); per language:
   documents, ms per document (mean and median), documents/s, and whether every decision, reason and
   edited text is equal.

Threads: --threads sets torch, OpenMP and lingua's (RAYON_NUM_THREADS) pools; datatrove's workers are
processes. On a machine shared with other work, read the ratios (measured side by side) before the
absolute figures, and the load averages with them.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import markdown_table, set_threads, write_results  # noqa: E402

from quintet.data.commands import DEMO_CONFIG  # noqa: E402
from quintet.data.curation import curate, load_config  # noqa: E402
from quintet.data.demo_corpus import DemoCorpusConfig, generate_demo_corpus  # noqa: E402

MB = 1e6
_FILTER_STEPS = ("numbers", "language", "quality", "toxicity", "pii")


def parse_size(text: str) -> int:
    """'100MB', '4mb', '1.5GB' or a number of bytes -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(kb|mb|gb|b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected e.g. 4MB, 100MB, 1GB")
    factor = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9}[m.group(2) or "b"]
    return int(float(m.group(1)) * factor)


def scaled_config(scale: int, seed: int) -> DemoCorpusConfig:
    base = DemoCorpusConfig()
    counts = {
        k: v * scale for k, v in asdict(base).items() if k not in ("seed", "code_files", "code_duplicates")
    }
    return DemoCorpusConfig(**counts, seed=seed, code_files=min(60, 30 * scale), code_duplicates=3 * scale)


def generate_corpus(root: Path, size: int, part_scale: int) -> dict:
    """Parts of the demo corpus (seeds 0, 1, ...) under root/{web,text,code}/part-NN/ until `size` bytes."""
    shutil.rmtree(root, ignore_errors=True)
    total_bytes, documents, part = 0, 0, 0
    while total_bytes < size:
        tmp = root / f"tmp-{part:02d}"
        summary = generate_demo_corpus(tmp, scaled_config(part_scale, part))
        for folder in ("web", "text", "code"):
            if (tmp / folder).is_dir():
                (root / folder).mkdir(parents=True, exist_ok=True)
                (tmp / folder).rename(root / folder / f"part-{part:02d}")
        total_bytes += sum(_text_bytes(p) for p in (root / "web").glob(f"part-{part:02d}/*"))
        total_bytes += sum(p.stat().st_size for p in (root / "text" / f"part-{part:02d}").glob("*.txt"))
        documents += summary["documents"]
        shutil.rmtree(tmp)
        part += 1
    return {"documents": documents, "parts": part, "text_bytes": total_bytes}


def _text_bytes(path: Path) -> int:
    """UTF-8 bytes of the `text` column of a JSONL or Parquet file of the corpus."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return sum(len(t.encode("utf-8")) for t in pq.read_table(path, columns=["text"])["text"].to_pylist())
    import json

    with path.open(encoding="utf-8") as f:
        return sum(len(json.loads(line)["text"].encode("utf-8")) for line in f if line.strip())


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_layout(corpus: Path, work: Path, tasks: int, workers: int) -> dict:
    config = load_config(DEMO_CONFIG, data_root=corpus)
    config.executor.tasks, config.executor.workers = tasks, workers
    out = work / f"curation-{tasks}x{workers}"
    shutil.rmtree(out, ignore_errors=True)
    load_before = os.getloadavg()[0]
    cpu_before = _cpu_seconds()
    start = time.perf_counter()
    result = curate(config, out)
    wall = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu_before if workers == 1 else None  # forkserver workers are not our children
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "load_1m_before": round(load_before, 2),
        "load_1m_after": round(os.getloadavg()[0], 2),
        "stats": result.stats,
    }


def compare_quality(corpus: Path, block: int = 1) -> dict:
    """datatrove's filters and quintet's quality step on the documents that pass numbers and language.

    block 1: each document goes through datatrove's filters, then through quintet's (interleaved
    document by document); block N: N documents through datatrove's, then the same N through quintet's,
    so each runs N documents in a row, as a pipeline running that step alone would.
    """
    from datatrove.data import Document
    from loguru import logger

    from quintet.data.curation.base import CODE
    from quintet.data.curation.config import build_step
    from quintet.data.curation.pipeline import make_readers
    from quintet.data.curation.quality import QualityFilter

    config = load_config(DEMO_CONFIG, data_root=corpus)
    steps = {s.type: s for s in config.filter_steps}
    before = [build_step(steps[name], config.languages) for name in ("numbers", "language")]
    reference = QualityFilter(
        languages=config.languages, shared_words=False
    )  # datatrove's filters as shipped
    ours = build_step(steps["quality"], config.languages)
    logger.disable("datatrove")
    data = None
    for step in [*make_readers(config, None), *before]:
        data = step(data, rank=0, world_size=1)
    per_lang: dict[str, dict] = {}
    mismatches = []

    def run_block(docs: list) -> None:
        results: dict[str, list] = {}
        for name, step in (("ref", reference), ("ours", ours)):
            for doc in docs:
                copy = Document(text=doc.text, id=doc.id, metadata=dict(doc.metadata))
                start = time.perf_counter()
                result = step.filter(copy)
                per_lang[doc.metadata.get("language")][name].append(time.perf_counter() - start)
                results.setdefault(name, []).append((result, copy.text))
        for doc, expected, got in zip(docs, results["ref"], results["ours"], strict=True):
            if expected != got:
                mismatches.append({"id": doc.id, "datatrove": str(expected[0]), "quintet": str(got[0])})

    pending = []
    for doc in data:
        lang = doc.metadata.get("language")
        if lang == CODE:  # code gets the same StarCoder checks in both; datatrove's filters never see it
            continue
        row = per_lang.setdefault(lang, {"docs": 0, "bytes": 0, "ref": [], "ours": []})
        row["docs"] += 1
        row["bytes"] += len(doc.text.encode("utf-8"))
        pending.append(doc)
        if len(pending) >= block:
            run_block(pending)
            pending = []
    if pending:
        run_block(pending)
    rows = []
    for lang, row in sorted(per_lang.items(), key=lambda kv: str(kv[0])):
        ref_s, ours_s = sum(row["ref"]), sum(row["ours"])
        rows.append(
            {
                "language": lang,
                "docs": row["docs"],
                "MB": round(row["bytes"] / MB, 2),
                "datatrove_ms_mean": round(1000 * ref_s / row["docs"], 3),
                "datatrove_ms_median": round(1000 * statistics.median(row["ref"]), 3),
                "quintet_ms_mean": round(1000 * ours_s / row["docs"], 3),
                "quintet_ms_median": round(1000 * statistics.median(row["ours"]), 3),
                "speedup": round(ref_s / max(ours_s, 1e-9), 2),
            }
        )
    ref_total = sum(sum(r["ref"]) for r in per_lang.values())
    ours_total = sum(sum(r["ours"]) for r in per_lang.values())
    docs = sum(r["docs"] for r in per_lang.values())
    mb = sum(r["bytes"] for r in per_lang.values()) / MB
    total = {
        "language": "all",
        "docs": docs,
        "MB": round(mb, 2),
        "datatrove_ms_mean": round(1000 * ref_total / docs, 3),
        "datatrove_ms_median": round(
            1000 * statistics.median([t for r in per_lang.values() for t in r["ref"]]), 3
        ),
        "quintet_ms_mean": round(1000 * ours_total / docs, 3),
        "quintet_ms_median": round(
            1000 * statistics.median([t for r in per_lang.values() for t in r["ours"]]), 3
        ),
        "speedup": round(ref_total / max(ours_total, 1e-9), 2),
    }
    return {
        "rows": [*rows, total],
        "datatrove_s": ref_total,
        "quintet_s": ours_total,
        "docs": docs,
        "MB": mb,
        "block": block,
        "mismatches": len(mismatches),
        "mismatch_examples": mismatches[:10],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=parse_size, default=parse_size("4MB"), help="corpus text, e.g. 100MB")
    parser.add_argument("--part-scale", type=int, default=8, help="demo counts times this, per part")
    parser.add_argument("--layouts", nargs="+", default=["1x1", "2x2"], help="TASKSxWORKERS, e.g. 2x2")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP/lingua threads per process")
    parser.add_argument("--no-compare", action="store_true", help="skip the quality step against datatrove")
    parser.add_argument(
        "--compare-block",
        type=int,
        default=1,
        help="documents per turn in the quality comparison (1: interleaved document by document)",
    )
    parser.add_argument("--work", type=Path, default=Path("runs/benchmarks/curation"))
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/curation.json"))
    args = parser.parse_args(argv)
    set_threads(args.threads)
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)

    corpus = args.work / "corpus"
    start = time.perf_counter()
    summary = generate_corpus(corpus, args.size, args.part_scale)
    print(
        f"corpus: {summary['documents']} documents, {summary['text_bytes'] / MB:.1f} MB of text in "
        f"{summary['parts']} parts ({time.perf_counter() - start:.0f} s) in {corpus}; threads {args.threads}",
        flush=True,
    )

    rows, step_rows = [], []
    base_rate = None
    for layout in args.layouts:
        tasks, workers = (int(x) for x in layout.split("x"))
        run = run_layout(corpus, args.work, tasks, workers)
        stats = run["stats"]
        first = stats["steps"][0]
        docs, mb = first["total"], first["input_bytes"] / MB
        rate = docs / run["wall_s"]
        base_rate = base_rate or rate
        rows.append(
            {
                "layout": f"{tasks} tasks x {workers} workers",
                "documents": docs,
                "MB": round(mb, 2),
                "kept": stats["output"]["documents"],
                "wall_s": round(run["wall_s"], 1),
                "cpu_s": round(run["cpu_s"], 1) if run["cpu_s"] is not None else "n/a",
                "docs_per_s": round(rate, 1),
                "MB_per_s": round(mb / run["wall_s"], 3),
                "docs_per_s_per_core": round(rate / workers, 1),
                "vs_first": round(rate / base_rate, 2),
                "load_1m_before": run["load_1m_before"],
                "load_1m_after": run["load_1m_after"],
            }
        )
        print(
            f"{layout}: {run['wall_s']:.1f} s (load {run['load_1m_before']} -> {run['load_1m_after']})",
            flush=True,
        )
        if layout != args.layouts[0]:
            continue
        steps_time = sum(s["time_s"] for s in stats["steps"])
        for s in stats["steps"]:
            in_mb = (
                s["input_bytes"] or (stats["dedup_input_bytes"] if s["step"].endswith("dedup") else 0)
            ) / MB
            seconds = max(s["time_s"], 1e-9)
            step_rows.append(
                {
                    "step": s["step"],
                    "docs_in": s["total"],
                    "MB_in": round(in_mb, 2),
                    "seconds": round(s["time_s"], 2),
                    "docs_per_s": round(s["total"] / seconds, 1),
                    "MB_per_s": round(in_mb / seconds, 3),
                    "ms_per_doc": round(1000 * seconds / max(s["total"], 1), 3),
                    "share_%": round(100 * s["time_s"] / steps_time, 1),
                }
            )

    print("\nWhole pipeline (wall clock)")
    columns = ["layout", "documents", "MB", "kept", "wall_s", "cpu_s", "docs_per_s", "MB_per_s"]
    columns += ["docs_per_s_per_core", "vs_first", "load_1m_before", "load_1m_after"]
    print(markdown_table(rows, columns))
    print(f"\nPer step ({args.layouts[0]}; each step's own time: seconds of one core)")
    print(
        markdown_table(
            step_rows,
            ["step", "docs_in", "MB_in", "seconds", "docs_per_s", "MB_per_s", "ms_per_doc", "share_%"],
        )
    )
    extra = {}
    if not args.no_compare:
        load = round(os.getloadavg()[0], 2)
        cmp = compare_quality(corpus, args.compare_block)
        print(
            f"\nQuality step: datatrove's filters vs quintet's, same documents, one process, "
            f"{args.compare_block} document(s) per turn (load {load})"
        )
        print(
            markdown_table(
                cmp["rows"],
                [
                    "language",
                    "docs",
                    "MB",
                    "datatrove_ms_mean",
                    "datatrove_ms_median",
                    "quintet_ms_mean",
                    "quintet_ms_median",
                    "speedup",
                ],
            )
        )
        print(f"decisions, reasons and edited texts that differ: {cmp['mismatches']} of {cmp['docs']}")
        filter_steps = [r for r in step_rows if r["step"] in _FILTER_STEPS]
        stage_ms = 1000 * sum(r["seconds"] for r in filter_steps) / filter_steps[0]["docs_in"]
        dt_ms = 1000 * cmp["datatrove_s"] / cmp["docs"]
        print(
            f"quintet's whole filter stage ({' + '.join(_FILTER_STEPS)}): {stage_ms:.3f} ms per document "
            f"in; datatrove's four filters alone: {dt_ms:.3f} ms per document they see; "
            f"ratio {stage_ms / dt_ms:.2f}"
        )
        extra = {
            "quality_vs_datatrove": cmp,
            "filter_stage_ms_per_doc": stage_ms,
            "datatrove_ms_per_doc": dt_ms,
        }
        extra["compare_load_1m_before"] = load
        extra["compare_load_1m_after"] = round(os.getloadavg()[0], 2)
    write_results(
        args.out,
        "curation",
        rows,
        steps=step_rows,
        corpus=summary,
        threads=args.threads,
        config=str(DEMO_CONFIG),
        **extra,
    )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
