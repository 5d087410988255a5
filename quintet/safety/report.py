"""Red-team reports: JSON for machines, Markdown and a PNG bar chart for people, a table for terminals."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from quintet.io import atomic_path, atomic_write_text
from quintet.safety.redteam_sets import load_categories

KIND_TITLE = {
    "harmful": "harmful-compliance rate (lower is safer)",
    "benign": "over-refusal rate on benign prompts (lower is more helpful)",
}
NOTE = (
    "`compliance` = a non-empty answer that does not refuse: the harmful-compliance rate is an upper bound "
    "on harmful compliance (the judge does not check that an answer contains harmful content). Rates are "
    "over judged prompts (errors excluded); empty answers count in the denominator and are listed separately."
)


def _rate(cell: dict[str, Any], kind: str) -> str:
    if cell["rate"] is None:
        return "n/a"
    hits = cell["compliance"] if kind == "harmful" else cell["refusal"]
    return f"{cell['rate']:.2f} ({hits}/{cell['n'] - cell['error']})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _keys(report: dict[str, Any], kind: str, part: str) -> list[str]:
    keys: list[str] = []
    for m in report["models"]:
        keys += [k for k in m[kind][part] if k not in keys]
    return keys


def markdown_report(report: dict[str, Any]) -> str:
    models = report["models"]
    names = [m["name"] for m in models]
    p = report["prompts"]
    n_kind = {k: models[0][k]["overall"]["n"] for k in ("harmful", "benign")} if models else {}
    lines = [
        "# Red-team report",
        "",
        f"Judge: `{report['judge']}`"
        + (
            ""
            if report["judges_benign"]
            else " (benign prompts judged by `quintet`: this judge rates safety only)"
        )
        + f". Prompts: {p['source']}, {p['n']} in all ({n_kind.get('harmful', 0)} harmful, "
        f"{n_kind.get('benign', 0)} benign)"
        + (f", at most {p['per_cell']} per kind x category x language" if p["per_cell"] else "")
        + f". Greedy decoding, at most {report['config']['max_new_tokens']} new tokens.",
        "",
        NOTE,
        "",
        "## Overall",
        "",
    ]
    rows = []
    for m in models:
        h, b = m["harmful"]["overall"], m["benign"]["overall"]
        refused = f"{h['refusal'] / (h['n'] - h['error']):.2f}" if h["n"] - h["error"] else "n/a"
        counts = [str(h[k] + b[k]) for k in ("empty", "unknown", "error")]
        seconds = f"{m['seconds']['generate']:.1f}"
        rows.append([m["name"], _rate(h, "harmful"), refused, _rate(b, "benign"), *counts, seconds])
    header = [
        "model",
        "harmful compliance",
        "refusal on harmful",
        "over-refusal",
        "empty",
        "unknown",
        "errors",
    ]
    lines += _table([*header, "generate s"], rows)
    cat_names = {k: v["name"] for k, v in load_categories().items()}
    for part, label in (("by_category", "category"), ("by_language", "language")):
        for kind in ("harmful", "benign"):
            lines += ["", f"## {KIND_TITLE[kind][0].upper()}{KIND_TITLE[kind][1:]}, by {label}", ""]
            rows = [
                [cat_names.get(k, k) if part == "by_category" else k]
                + [_rate(m[kind][part][k], kind) if k in m[kind][part] else "n/a" for m in models]
                for k in _keys(report, kind, part)
            ]
            lines += _table([label, *names], rows)
    for m in models:
        for kind in ("harmful", "benign"):
            langs = _keys(report, kind, "by_language")
            lines += ["", f"## {m['name']}: {KIND_TITLE[kind].split(' (')[0]}, category x language", ""]
            rows = [
                [c]
                + [
                    _rate(m[kind]["by_cell"][c][g], kind) if g in m[kind]["by_cell"][c] else "n/a"
                    for g in langs
                ]
                for c in m[kind]["by_cell"]
            ]
            lines += _table(["category", *langs], rows)
    lines += _comparison_lines(report)
    lines += ["", f"Generations: {', '.join(m['generations'] for m in models)}; chart: redteam.png.", ""]
    return "\n".join(lines)


def _difference(cell: dict[str, Any]) -> str:
    if cell["difference"] is None:
        return "n/a"
    lo, hi = cell["ci95"]
    return f"{cell['difference']:+.2f} [{lo:+.2f}, {hi:+.2f}] (n={cell['n']})"


def _comparison_lines(report: dict[str, Any]) -> list[str]:
    comp = report.get("comparison")
    if not comp:
        return []
    a, b = comp["a"], comp["b"]
    lines = ["", f"## {b} against {a}: difference of the rates (95% interval), same prompts", ""]
    rows = []
    for kind in ("harmful", "benign"):
        label = KIND_TITLE[kind].split(" (")[0]
        rows.append([label, "overall", _difference(comp[kind]["overall"])])
        for part in ("by_category", "by_language"):
            rows += [[label, k, _difference(v)] for k, v in comp[kind][part].items()]
    lines += _table(["rate", "slice", f"{b} - {a}"], rows)
    changed = comp["changed"]
    lines += ["", f"## Prompts whose verdict changed ({len(changed)})", ""]
    rows = [
        [c["id"], c["kind"], c["category"], c["lang"], c["verdict_a"], c["verdict_b"],
         c["prompt"][:60].replace("|", "/").replace("\n", " ")]
        for c in changed
    ]  # fmt: skip
    lines += _table(["id", "kind", "category", "lang", a, b, "prompt"], rows)
    return lines


def plot_report(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Bars per model: harmful compliance and over-refusal, by category and by language (2 x 2 panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8), constrained_layout=True)
    width = 0.8 / max(len(models), 1)
    for row, part in enumerate(("by_category", "by_language")):
        for col, kind in enumerate(("harmful", "benign")):
            ax = axes[row][col]
            keys = _keys(report, kind, part)
            for i, m in enumerate(models):
                values = [(m[kind][part].get(k) or {}).get("rate") or 0.0 for k in keys]
                xs = [x + (i - (len(models) - 1) / 2) * width for x in range(len(keys))]
                ax.bar(xs, values, width, label=m["name"])
            ax.set_xticks(range(len(keys)), keys, rotation=30 if part == "by_category" else 0, ha="right")
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{KIND_TITLE[kind]}, {part.replace('by_', 'by ')}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=max(len(models), 1))
    fig.suptitle(f"Red-team: judge {report['judge']}, {report['prompts']['n']} prompts")
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """report.json, report.md and redteam.png under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "png": out / "redteam.png"}
    report["files"] = {k: str(v) for k, v in paths.items()}
    atomic_write_text(paths["json"], json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(paths["markdown"], markdown_report(report))
    plot_report(report, paths["png"])
    return paths


def format_differences(report: dict[str, Any]) -> str:
    """The paired comparison of a two-model report, for terminals: overall differences and the count of
    changed verdicts (the report's Markdown lists them)."""
    comp = report.get("comparison")
    if not comp:
        return ""
    lines = [f"{comp['b']} - {comp['a']} on the same prompts (95% interval):"]
    for kind in ("harmful", "benign"):
        lines.append(f"  {KIND_TITLE[kind].split(' (')[0]:<38}{_difference(comp[kind]['overall'])}")
    lines.append(f"  verdicts changed: {len(comp['changed'])}")
    return "\n".join(lines)


def format_comparison(report: dict[str, Any]) -> str:
    """A terminal table: rows overall / categories / languages, columns the two rates per model."""
    models = report["models"]
    names = [m["name"] for m in models]
    p = report["prompts"]
    cell_w = max(14, *(len(n) + 2 for n in names))
    head = f"{'':26}" + "".join(f"{'harmful compliance':<{cell_w * len(names)}}") + "over-refusal (benign)"
    sub = f"{'':26}" + "".join(f"{n:<{cell_w}}" for n in names) * 2
    lines = [
        f"red-team: judge {report['judge']}, {p['n']} prompts ({p['source']})",
        head,
        sub,
    ]

    def row(label: str, part: str | None, key: str | None) -> str:
        cells = []
        for kind in ("harmful", "benign"):
            for m in models:
                cell = m[kind]["overall"] if part is None else m[kind][part].get(key)
                cells.append(f"{_rate(cell, kind) if cell else 'n/a':<{cell_w}}")
        return f"{label[:25]:<26}" + "".join(cells)

    lines.append(row("overall", None, None))
    for part in ("by_category", "by_language"):
        for key in _keys(report, "harmful", part):
            lines.append(row(key, part, key))
    lines += [empty_answers_line(m) for m in models]
    lines += [w for m in models for w in empty_answers_warnings(m)]
    return "\n".join(lines)


def empty_answers_line(model: dict[str, Any]) -> str:
    """How many of a model's answers were empty, by kind of prompt."""
    h, b = model["harmful"]["overall"], model["benign"]["overall"]
    return (
        f"{model['name']}: {h['empty'] + b['empty']} of {h['n'] + b['n']} answers empty "
        f"({h['empty']} of {h['n']} harmful, {b['empty']} of {b['n']} benign)"
    )


def empty_answers_warnings(model: dict[str, Any]) -> list[str]:
    """A warning per kind of prompt whose judged answers are mostly empty: its rate then measures nothing
    (an empty answer is neither compliance nor refusal, and counts in the denominator)."""
    warnings = []
    for kind, rate in (("harmful", "harmful-compliance"), ("benign", "over-refusal")):
        cell = model[kind]["overall"]
        judged = cell["n"] - cell["error"]
        if judged and cell["empty"] * 2 > judged:
            warnings.append(
                f"warning: {model['name']}: {cell['empty']} of {judged} answers to {kind} prompts are empty; "
                f"its {rate} rate is meaningless (the model generates nothing: check its tokenizer, chat "
                "template and max_new_tokens)"
            )
    return warnings
