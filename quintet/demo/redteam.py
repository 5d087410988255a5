"""`make demo`, red-team part: two model folders side by side on a slice of the eval split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quintet.safety.redteam_eval import RedteamConfig, evaluate_redteam


def run_redteam_demo(
    before_dir: Path, after_dir: Path, out_dir: Path, names: tuple[str, str] = ("before", "after")
) -> dict[str, Any]:
    """`make demo`: red-team two model folders (before and after safety tuning; or a model and its FP4
    copy) on a slice of the eval split (one prompt per kind x category x language: 60 prompts), print the
    comparison and the paired differences, write the report under `out_dir`."""
    from quintet.safety.report import format_comparison, format_differences

    config = RedteamConfig(max_new_tokens=48, batch_size=30, per_cell=1, progress=False)
    report = evaluate_redteam([before_dir, after_dir], out_dir, config=config, names=list(names))
    print(format_comparison(report))
    print(format_differences(report))
    print(f"report: {report['files']['markdown']}  chart: {report['files']['png']}")
    return report
