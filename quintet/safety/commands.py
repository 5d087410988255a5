"""`quintet safety ...`: build the red-team sets and the safety training data. Thin: parse, call, print."""

from __future__ import annotations

import argparse
import json


def _cmd_build(args: argparse.Namespace) -> int:
    from quintet.safety.redteam_sets import build_safety_data, read_redteam_prompts

    paths = build_safety_data(args.out, seed=args.seed, eval_fraction=args.eval_fraction)
    counts = {split: len(read_redteam_prompts(paths[split])) for split in ("train", "eval")}
    print(json.dumps({"files": {k: str(v) for k, v in paths.items()}, "prompts": counts}, indent=2))
    return 0


def add_safety_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `safety build --out DIR [--seed N] [--eval-fraction F]` to the `quintet` command."""
    safety = subparsers.add_parser("safety", help="red-team sets and safety training data")
    sub = safety.add_subparsers(dest="safety_command", required=True)
    build = sub.add_parser(
        "build",
        help="write redteam-train/eval.jsonl (six categories x five languages, benign look-alikes) and the "
        "train split's safety-sft.jsonl (CAT/SFT rows) and safety-pairs.jsonl (sDPO pairs)",
    )
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument("--seed", type=int, default=0, help="seed of the train/eval split (default 0)")
    build.add_argument("--eval-fraction", type=float, default=0.25, help="share of acts held out for eval")
    build.set_defaults(func=_cmd_build)
    return safety
