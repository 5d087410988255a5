"""Curation throughput: documents/s and MB/s for the whole pipeline, and per step (which step dominates).

    python benchmarks/curation.py [--scale 4] [--layouts 1x1 2x2] [--out runs/benchmarks/curation.json]

The corpus is the demo corpus with every count multiplied by --scale (scale 1: 593 documents, 0.83 MB).
The config is configs/curation-demo.toml (numbers, language, quality, toxicity, pii, exact + MinHash
dedup) run on datatrove's local executor with each --layouts entry TASKSxWORKERS (tasks: how the input is
split; workers: processes at once). Whole-pipeline figures are wall clock, from the first stage to the
statistics written. Per-step figures are each step's own time as datatrove measures it (time_stats,
summed over tasks: the seconds of one core), with the bytes of text that entered the step. cpu_s is the
CPU time of the benchmark process (with one worker, where every task runs in it); load_1m is the machine's
1-minute load average when the run started: on a machine shared with other work, wall_s can be much longer
than cpu_s.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
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


def scaled_corpus(root: Path, scale: int) -> dict:
    base = DemoCorpusConfig()
    counts = {
        k: v * scale for k, v in asdict(base).items() if k not in ("seed", "code_files", "code_duplicates")
    }
    config = DemoCorpusConfig(**counts, code_files=min(60, 30 * scale), code_duplicates=3 * scale)
    return generate_demo_corpus(root, config)


def run_layout(corpus: Path, work: Path, tasks: int, workers: int) -> dict:
    config = load_config(DEMO_CONFIG, data_root=corpus)
    config.executor.tasks, config.executor.workers = tasks, workers
    out = work / f"curation-{tasks}x{workers}"
    shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()[0]
    cpu_before = _cpu_seconds()
    start = time.perf_counter()
    result = curate(config, out)
    wall = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu_before if workers == 1 else None  # forkserver workers are not our children
    return {"wall_s": wall, "cpu_s": cpu, "load_1m": round(load, 2), "stats": result.stats}


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (datatrove's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--layouts", nargs="+", default=["1x1", "2x2"], help="TASKSxWORKERS, e.g. 2x2")
    parser.add_argument("--work", type=Path, default=Path("runs/benchmarks/curation"))
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/curation.json"))
    args = parser.parse_args(argv)
    set_threads(1)  # datatrove's workers are processes; each step is single-threaded

    corpus = args.work / f"corpus-x{args.scale}"
    shutil.rmtree(corpus, ignore_errors=True)
    summary = scaled_corpus(corpus, args.scale)
    print(f"corpus: {summary['documents']} documents (scale {args.scale}) in {corpus}")

    rows, step_rows, stage_rows = [], [], []
    for layout in args.layouts:
        tasks, workers = (int(x) for x in layout.split("x"))
        run = run_layout(corpus, args.work, tasks, workers)
        stats = run["stats"]
        first = stats["steps"][0]
        docs, mb = first["total"], first["input_bytes"] / MB
        rows.append(
            {
                "layout": f"{tasks} tasks x {workers} workers",
                "documents": docs,
                "MB": round(mb, 3),
                "kept": stats["output"]["documents"],
                "wall_s": round(run["wall_s"], 2),
                "cpu_s": round(run["cpu_s"], 2) if run["cpu_s"] is not None else "n/a",
                "load_1m": run["load_1m"],
                "docs_per_s": round(docs / run["wall_s"], 1),
                "MB_per_s": round(mb / run["wall_s"], 4),
            }
        )
        print(f"{layout}: {run['wall_s']:.1f} s", flush=True)
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
                    "MB_in": round(in_mb, 3),
                    "seconds": round(s["time_s"], 3),
                    "docs_per_s": round(s["total"] / seconds, 1),
                    "MB_per_s": round(in_mb / seconds, 3),
                    "share_%": round(100 * s["time_s"] / steps_time, 1),
                }
            )
        for stage, wall in stats.get("stage_wall_s", {}).items():
            stage_rows.append(
                {"stage": stage, "wall_s": wall, "share_%": round(100 * wall / run["wall_s"], 1)}
            )

    print("\nWhole pipeline (wall clock, 2-core machine)")
    print(
        markdown_table(
            rows,
            ["layout", "documents", "MB", "kept", "wall_s", "cpu_s", "load_1m", "docs_per_s", "MB_per_s"],
        )
    )
    print(f"\nPer step ({args.layouts[0]}; each step's own time, one core)")
    print(
        markdown_table(
            step_rows, ["step", "docs_in", "MB_in", "seconds", "docs_per_s", "MB_per_s", "share_%"]
        )
    )
    print(f"\nPer stage ({args.layouts[0]}; wall clock)")
    print(markdown_table(stage_rows, ["stage", "wall_s", "share_%"]))
    write_results(
        args.out,
        "curation",
        rows,
        steps=step_rows,
        stages=stage_rows,
        scale=args.scale,
        config=str(DEMO_CONFIG),
    )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
