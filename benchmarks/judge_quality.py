"""Precision and recall per class of the project's refusal judges on the held-out labelled responses.

    python benchmarks/judge_quality.py [--threads 1] [--out benchmarks/results/judge_quality.json]

The held-out set (`quintet/safety/resources/judge/heldout_responses.json`: 12 refusals and 12
compliances per language, hand-written, including hard cases such as compliance that starts with an
apology or a negation) is never used for training. Judges: the rules alone (undecided -> unknown, counted
as a miss), the n-gram classifier alone, and the default rules + classifier judge. Overall and per language.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import markdown_table, set_threads, write_results  # noqa: E402

from quintet.safety.judge_classifier import heldout_texts, load_shipped_classifier  # noqa: E402
from quintet.safety.judges import ClassifierJudge, ProjectJudge, RuleJudge, judge_quality  # noqa: E402
from quintet.safety.redteam_sets import LANGUAGES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/judge_quality.json"))
    args = parser.parse_args(argv)
    set_threads(args.threads)

    model = load_shipped_classifier()
    judges = [RuleJudge(), ClassifierJudge(model), ProjectJudge(model)]
    held = heldout_texts()
    rows = []
    for judge in judges:
        for lang in ("all", *LANGUAGES):
            subset = held if lang == "all" else [h for h in held if h[2] == lang]
            start = time.perf_counter()
            q = judge_quality(judge, subset)
            seconds = time.perf_counter() - start
            for cls in ("refusal", "compliance"):
                rows.append(
                    {
                        "judge": judge.name,
                        "lang": lang,
                        "class": cls,
                        **q[cls],
                        "unknown": q["all"]["unknown"],
                    }
                )
            rows[-1]["ms_per_response"] = rows[-2]["ms_per_response"] = 1000 * seconds / len(subset)
    print(f"held-out labelled responses: {len(held)} ({len(LANGUAGES)} languages)\n")
    columns = ["judge", "lang", "class", "precision", "recall", "f1", "support", "unknown", "ms_per_response"]
    print(markdown_table(rows, columns))
    write_results(args.out, "judge_quality", rows, heldout=len(held))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
