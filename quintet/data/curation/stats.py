"""Curation statistics: kept and dropped per step, per reason and per language; JSON, Markdown and a PNG.

Read back from datatrove's per-task statistics (`logs/<stage>/stats/<rank>.json`), merged over tasks, so a
resumed run reports every task once. Per language, a document counts under the language known when it
left the pipeline: the declared one if a step before language identification dropped it, the detected one
after (a German page in the English crawl shows as `de`, dropped by `language`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quintet.io import atomic_path, atomic_write_text

STAGES = (
    "filter",
    "exact_signatures",
    "exact_find",
    "minhash_signatures",
    "minhash_buckets",
    "minhash_clusters",
    "final",
)


@dataclass
class _Block:
    """One step's statistics, summed over tasks: counter totals, counts of values, seconds of work."""

    kind: str
    name: str
    totals: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def _value(raw: Any) -> tuple[float, int]:
    """(total, n) of a datatrove metric as saved: a plain number, or a dict with total and maybe n."""
    if isinstance(raw, dict):
        total = raw.get("total", 0)
        return total, int(raw.get("n", total if raw.get("mean", 1) == 1 else 1))
    return raw, int(raw)


def _merged_stage(stage_dir: Path) -> list[_Block]:
    """datatrove's per-task statistics files of one stage, summed block by block (order kept)."""
    blocks: dict[str, _Block] = {}
    for path in sorted((stage_dir / "stats").glob("*.json")):
        for raw in json.loads(path.read_text()):
            kind, _, name = raw["name"].partition(": ")
            block = blocks.setdefault(raw["name"], _Block(kind, name))
            block.seconds += float(_value(raw.get("time_stats", 0.0))[0])
            for key, metric in raw.get("stats", {}).items():
                total, n = _value(metric)
                block.totals[key] = block.totals.get(key, 0) + total
                block.counts[key] = block.counts.get(key, 0) + n
    return list(blocks.values())


def _step_report(name: str, counters: dict[str, float], seconds: float) -> dict[str, Any]:
    by_lang: dict[str, dict[str, Any]] = {}
    reasons, extra = {}, {}
    for key, value in counters.items():
        lang, slash, metric = key.rpartition("/")
        target = (
            by_lang.setdefault(lang, {"total": 0, "kept": 0, "dropped": 0, "reasons": {}}) if slash else None
        )
        metric = metric if slash else key
        if metric.startswith("dropped_"):
            (target["reasons"] if target is not None else reasons)[metric[len("dropped_") :]] = int(value)
        elif metric == "input_bytes":
            continue
        elif metric in ("total", "dropped", "forwarded"):
            if target is not None:
                target["kept" if metric == "forwarded" else metric] = int(value)
        elif target is not None:
            target.setdefault("extra", {})[metric] = int(value)
        else:
            extra[metric] = int(value)
    total = int(counters.get("total", 0))
    kept = int(counters.get("forwarded", total - counters.get("dropped", 0)))
    return {
        "step": name,
        "total": total,
        "kept": kept,
        "dropped": int(counters.get("dropped", 0)),
        "input_bytes": int(counters.get("input_bytes", 0)),
        "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "extra": extra,
        "by_language": by_lang,
        "time_s": round(seconds, 4),
    }


def collect_stats(out_dir: str | Path) -> dict[str, Any]:
    """The statistics of the curation in `out_dir` (see the module docstring)."""
    logs = Path(out_dir) / "logs"
    stages = {s: _merged_stage(logs / s) for s in STAGES if (logs / s / "stats").is_dir()}
    if "filter" not in stages:
        raise FileNotFoundError(f"{logs / 'filter'}: no statistics; has the curation run (to completion)?")
    inputs: dict[str, dict[str, Any]] = {}
    steps: list[dict[str, Any]] = []
    counters_by_name: dict[str, dict[str, float]] = {}
    stage_time: dict[str, float] = {}
    for stage, blocks in stages.items():
        stage_time[stage] = round(sum(b.seconds for b in blocks), 4)
        for block in blocks:
            counters_by_name[block.name] = block.totals
            if block.kind.endswith("READER") and block.name.startswith("read:"):
                totals = block.totals
                inputs[block.name[len("read:") :]] = {
                    "files": int(totals.get("input_files", 0)),
                    "documents": int(block.counts.get("doc_len", 0)),
                    "characters": int(totals.get("doc_len", 0)),
                    "skipped": {
                        k[len("skipped_") :]: int(v) for k, v in totals.items() if k.startswith("skipped_")
                    },
                    "time_s": round(block.seconds, 4),
                }
            elif _is_step(stage, block.kind, block.name):
                steps.append(_step_report(block.name, block.totals, block.seconds))
    _add_dedup_languages(steps, counters_by_name)
    final_counter = counters_by_name.get("dedup_output") or counters_by_name.get("output") or {}
    kept = {k.split("/")[0]: int(v) for k, v in final_counter.items() if k.endswith("/total")}
    report = {
        "inputs": inputs,
        "steps": steps,
        "output": {
            "documents": int(final_counter.get("total", 0)),
            "by_language": dict(sorted(kept.items())),
        },
        "stage_time_s": stage_time,
        "step_time_s": _block_times(stages),
    }
    timing = Path(out_dir) / "timing.json"
    if timing.is_file():
        report["stage_wall_s"] = json.loads(timing.read_text())["stage_wall_s"]
    dedup_input = counters_by_name.get("dedup_input", {})
    report["dedup_input_bytes"] = int(dedup_input.get("input_bytes", 0))
    report["languages"] = _language_table(report)
    report["languages_summary"] = _fold_other_languages(report["languages"], _targets(Path(out_dir)))
    return report


def _targets(out_dir: Path) -> list[str]:
    marker = out_dir / "curation.json"
    languages = json.loads(marker.read_text()).get("languages", []) if marker.is_file() else []
    return [*languages, "code"]


def _fold_other_languages(table: dict[str, dict[str, int]], targets: list[str]) -> dict[str, dict[str, int]]:
    """The language table with every language that is not a target and kept nothing in one `other` row."""
    folded: dict[str, dict[str, int]] = {}
    for lang, row in table.items():
        key = lang if lang in targets or row.get("kept", 0) else "other"
        target = folded.setdefault(key, {})
        for column, n in row.items():
            target[column] = target.get(column, 0) + n
    return folded


def _is_step(stage: str, kind: str, name: str) -> bool:
    """Our filter and format steps (in the filter stage) and datatrove's dedup filters (in the final one)."""
    if stage == "filter":
        return kind.endswith(("FILTER", "FORMAT"))
    return stage == "final" and name in ("exact_dedup", "minhash_dedup")


def _block_times(stages: dict[str, list[_Block]]) -> dict[str, float]:
    """Seconds spent in each step's own work (datatrove's time_stats), summed over tasks."""
    times: dict[str, float] = {}
    for stage, blocks in stages.items():
        for block in blocks:
            key = block.name if stage in ("filter", "final") else f"{stage}:{block.name}"
            times[key] = round(times.get(key, 0.0) + block.seconds, 4)
    return times


def _add_dedup_languages(steps: list[dict[str, Any]], counters: dict[str, dict[str, float]]) -> None:
    """datatrove's dedup filters count no languages: take them from the counters around them."""
    has_exact_output = "exact_output" in counters
    spans = {
        "exact_dedup": ("dedup_input", "exact_output" if has_exact_output else "dedup_output"),
        "minhash_dedup": ("exact_output" if has_exact_output else "dedup_input", "dedup_output"),
    }
    for step in steps:
        if step["step"] not in spans:
            continue
        before, after = (counters.get(name, {}) for name in spans[step["step"]])
        for key, value in before.items():
            if key.endswith("/total"):
                out = int(after.get(key, 0))
                row = {"total": int(value), "kept": out, "dropped": int(value) - out, "reasons": {}}
                step["by_language"][key.split("/")[0]] = row


def _language_table(report: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per language: documents in, dropped by each step, kept (in = dropped + kept)."""
    table: dict[str, dict[str, int]] = {}
    drop_steps = [s for s in report["steps"] if s["dropped"] or s["reasons"] or s["step"].endswith("dedup")]
    for step in drop_steps:
        for lang, row in step["by_language"].items():
            table.setdefault(lang, {})[step["step"]] = int(row.get("dropped", 0))
    for lang, n in report["output"]["by_language"].items():
        table.setdefault(lang, {})["kept"] = n
    for row in table.values():
        row["in"] = sum(row.values())
    rows = [(lang, row) for lang, row in table.items() if row["in"]]
    return dict(sorted(rows, key=lambda kv: (-kv[1].get("kept", 0), kv[0])))


def stats_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables: steps, languages, inputs."""
    lines = ["## Curation steps", "", "| step | in | kept | dropped | dropped % | reasons | time (s) |"]
    lines.append("| --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for s in report["steps"]:
        pct = 100.0 * s["dropped"] / s["total"] if s["total"] else 0.0
        top = list(s["reasons"].items())
        reasons = ", ".join(f"{k} {v}" for k, v in top[:4]) + (
            f", {len(top) - 4} more" if len(top) > 4 else ""
        )
        reasons = reasons or "-"
        if s["step"] == "pii" or s["extra"].get("documents_redacted"):
            redacted = {k[len("redacted_") :]: v for k, v in s["extra"].items() if k.startswith("redacted_")}
            reasons = "redacted: " + (", ".join(f"{k} {v}" for k, v in redacted.items()) or "none")
        counts = f"{s['total']} | {s['kept']} | {s['dropped']} | {pct:.1f}"
        lines.append(f"| {s['step']} | {counts} | {reasons} | {s['time_s']:.2f} |")
    table = report["languages_summary"]
    columns = [s["step"] for s in report["steps"] if any(s["step"] in row for row in table.values())]
    lines += ["", "## By language", "", "| language | in | " + " | ".join(columns) + " | kept |"]
    lines.append("| --- | ---: | " + " | ".join("---:" for _ in columns) + " | ---: |")
    for lang, row in table.items():
        cells = " | ".join(str(row.get(c, 0)) for c in columns)
        lines.append(f"| {lang} | {row['in']} | {cells} | {row.get('kept', 0)} |")
    lines += ["", "## Inputs", "", "| input | files | documents | characters | skipped |"]
    lines.append("| --- | ---: | ---: | ---: | --- |")
    for name, inp in report["inputs"].items():
        skipped = ", ".join(f"{k} {v}" for k, v in inp["skipped"].items()) or "0"
        lines.append(f"| {name} | {inp['files']} | {inp['documents']} | {inp['characters']} | {skipped} |")
    lines += ["", f"Output: {report['output']['documents']} documents."]
    return "\n".join(lines) + "\n"


def stats_chart(report: dict[str, Any], path: str | Path) -> None:
    """A PNG bar chart: per language, documents kept and dropped by each step (stacked)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    table = report["languages_summary"]
    langs = list(table)
    columns = ["kept"] + [s["step"] for s in report["steps"] if any(s["step"] in r for r in table.values())]
    fig = Figure(figsize=(9, 0.45 * len(langs) + 1.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    left = [0] * len(langs)
    palette = iter(
        ["#1f77b4", "#ff7f0e", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"] * 3
    )
    for column in columns:
        values = [table[lang].get(column, 0) for lang in langs]
        color = "#2e7d32" if column == "kept" else next(palette)
        ax.barh(langs, values, left=left, label=column, color=color)
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("documents")
    ax.set_title("Curation: kept and dropped per step, by language")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def write_stats(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """stats.json, stats.md and stats.png in `out_dir`; returns their paths."""
    out = Path(out_dir)
    paths = {"json": out / "stats.json", "markdown": out / "stats.md", "png": out / "stats.png"}
    atomic_write_text(paths["json"], json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(paths["markdown"], stats_markdown(report))
    stats_chart(report, paths["png"])
    return paths
