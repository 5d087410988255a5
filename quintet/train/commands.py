"""`quintet train lm | vision`: thin argparse handlers, one library call each.

Both trainers start fresh unless given `--resume` (continue from the newest checkpoint in out_dir); an
out_dir that holds an earlier run is refused unless `--resume` or `--overwrite` (start over). One run at a
time may write an out_dir (a second one is refused, naming the first one's PID).
`python -m quintet.train ...` (what `torchrun -m` launches) parses the same arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from quintet.commands import add_debug_flag, configure_logging, run_command, show_defaults

OVERWRITE_HELP = "start over in an out_dir that holds an earlier run (deletes its checkpoints and metrics)"


def _cmd_train_lm(args: argparse.Namespace) -> int:
    from quintet.train.lm_config import TrainConfig

    configure_logging()  # what it is doing before the first progress bar
    config = TrainConfig.from_file(args.config)
    logging.getLogger("quintet.train").info("%s: loading the trainer (torch)", args.config)
    from quintet.train.lm import train_lm

    result = train_lm(config, resume=args.resume, overwrite=args.overwrite)
    summary = {
        "final_model": str(result.final_model),
        "metrics": str(result.metrics),
        "step": result.state.step,
        "stages": result.state.history,
    }
    print(json.dumps(summary, indent=2))
    return 0


def train_vision_command(args: argparse.Namespace, resume: bool) -> int:
    """`train vision` (and `vitar train`, which resumes unless --fresh): train, then print the evaluation."""
    from quintet.train.vision import load_train_config, train_vision

    configure_logging()
    overrides = {"out_dir": args.out} if args.out else {}
    config = load_train_config(args.config, **overrides)
    result = train_vision(config, resume=resume, overwrite=args.overwrite)
    print(f"trained {result.steps} steps; final loss {result.final_loss:.4f}; model in {result.model_dir}")
    for row in result.evaluation:
        accuracy, gflops = 100 * row["accuracy"], row["flops"] / 1e9
        print(f"  {row['resolution']:>5}px  accuracy {accuracy:.2f}%  {gflops:.3f} GFLOPs")
    return 0


def add_vision_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config (.toml or .json), e.g. configs/vitar-tiny.toml")
    parser.add_argument("--out", help="output folder (overrides out_dir of the config)")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `train lm` and `train vision` to the `quintet` command."""
    train = subparsers.add_parser("train", help="train models")
    sub = train.add_subparsers(dest="train_command", required=True)
    lm = sub.add_parser(
        "lm", help="pretrain a Jamba model through a curriculum (torchrun for several processes)"
    )
    lm.add_argument("config", help="training TOML")
    lm.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    lm.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    lm.set_defaults(func=_cmd_train_lm)

    vision = sub.add_parser("vision", help="multi-resolution ViTAR / ViT training from a TOML config")
    add_vision_train_arguments(vision)
    vision.add_argument("--resume", action="store_true", help="continue from the checkpoint in out_dir")
    vision.set_defaults(func=lambda args: train_vision_command(args, resume=args.resume))
    return train


def main(argv: list[str] | None = None) -> int:
    """`python -m quintet.train lm CONFIG [--resume]` (and `vision`): the train commands alone."""
    parser = argparse.ArgumentParser(prog="python -m quintet.train")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    add_debug_flag(parser)
    show_defaults(parser)
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    return run_command(args, prog="python -m quintet.train")
