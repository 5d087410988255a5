"""`quintet vitar train | eval | predict`: thin argparse handlers, one library call each.

The lead's `quintet/cli.py` calls `add_vitar_parser(subparsers)`; every handler takes the parsed
arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _resolutions(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--resolutions {text!r}: expected pixels separated by commas, e.g. 32,64"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"--resolutions {text!r}: expected positive integers, e.g. 32,64,128"
        )
    return values


def _logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")


def _cmd_train(args: argparse.Namespace) -> int:
    from quintet.train.vision import load_train_config, train_vision

    _logging()
    overrides = {"out_dir": args.out} if args.out else {}
    config = load_train_config(args.config, **overrides)
    result = train_vision(config, resume=not args.fresh)
    print(f"trained {result.steps} steps; final loss {result.final_loss:.4f}; model in {result.model_dir}")
    for row in result.evaluation:
        accuracy, gflops = 100 * row["accuracy"], row["flops"] / 1e9
        print(f"  {row['resolution']:>5}px  accuracy {accuracy:.2f}%  {gflops:.3f} GFLOPs")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from quintet.loading import load_model
    from quintet.models.vitar.evaluation import evaluate
    from quintet.train.vision import make_dataset

    _logging()
    model = load_model(args.model).to(args.device)  # a float or an FP4 folder
    dataset = make_dataset(args.data, seed=args.seed, num_images=args.num_images, device=args.device)
    results = evaluate(
        model,
        dataset,
        args.resolutions,
        num_images=args.num_images,
        max_tokens=args.max_tokens,
        skip_above_tokens=args.skip_above_tokens,
    )
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return 0
    print(f"{'resolution':>10}  {'accuracy':>9}  {'images':>6}  {'GFLOPs':>9}  {'tokens':>6}")
    for r in results:
        if r.skipped:
            print(f"{r.resolution:>8}px  skipped: {r.skipped}")
        else:
            accuracy, gflops = 100 * r.accuracy, r.flops / 1e9
            print(
                f"{r.resolution:>8}px  {accuracy:>8.2f}%  {r.total:>6}  {gflops:>9.3f}  {r.encoder_tokens:>6}"
            )
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from quintet.models.vitar.evaluation import predict_files

    predictions = predict_files(args.model, args.images, top_k=args.top_k, resolution=args.resolution)
    for p in predictions:
        if args.json:
            print(json.dumps({"image": p.path, "height": p.height, "width": p.width, "top": p.top}))
            continue
        ranked = ", ".join(f"{label} {100 * prob:.1f}%" for label, prob in p.top)
        print(f"{p.path} ({p.width}x{p.height}): {ranked}")
    return 0


def add_vitar_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `vitar` with `train`, `eval` and `predict` to the `quintet` command."""
    vitar = subparsers.add_parser("vitar", help="ViTAR: train, evaluate across resolutions, classify images")
    sub = vitar.add_subparsers(dest="vitar_command", required=True)

    train = sub.add_parser("train", help="multi-resolution training from a TOML config (resumes if it can)")
    train.add_argument("config", help="training config (.toml or .json), e.g. configs/vitar-tiny.toml")
    train.add_argument("--out", help="output folder (overrides out_dir of the config)")
    train.add_argument("--fresh", action="store_true", help="refuse to resume an existing checkpoint")
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="accuracy and counted FLOPs per resolution")
    ev.add_argument("--model", required=True, help="model folder (config.json + model.safetensors)")
    ev.add_argument("--resolutions", required=True, type=_resolutions, help="pixels, e.g. 32,64,128,256")
    ev.add_argument("--data", default="procedural", help="'procedural' (held-out scenes) or an image folder")
    ev.add_argument("--num-images", type=int, default=500)
    ev.add_argument("--seed", type=int, default=999_999, help="seed of the procedural evaluation scenes")
    ev.add_argument("--max-tokens", type=int, default=1 << 16, help="patch tokens per evaluation batch")
    ev.add_argument(
        "--skip-above-tokens", type=int, help="skip resolutions where the encoder sees more tokens"
    )
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ev.set_defaults(func=_cmd_eval)

    pr = sub.add_parser("predict", help="top-k classes of image files, each at its own size")
    pr.add_argument("--model", required=True, help="model folder")
    pr.add_argument("images", nargs="+", help="image files (any size; PNG, JPEG, ...)")
    pr.add_argument("--top-k", type=int, default=3)
    pr.add_argument("--resolution", type=int, help="resize to this square size first (default: native size)")
    pr.add_argument("--json", action="store_true", help="one JSON object per image")
    pr.set_defaults(func=_cmd_predict)
    return vitar
