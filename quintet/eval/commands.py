"""`quintet eval ...`: red-team, perplexity, multiple choice, lm-eval, vision accuracy per resolution, image
classification. Thin: parse, call, print."""

from __future__ import annotations

import argparse
import json

from quintet.commands import configure_logging


def _cmd_redteam(args: argparse.Namespace) -> int:
    from quintet.safety.redteam_eval import RedteamConfig, evaluate_redteam
    from quintet.safety.report import format_comparison, format_differences

    config = RedteamConfig(
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, per_cell=args.limit, seed=args.seed
    )
    models = [args.model] + ([args.compare] if args.compare else [])
    report = evaluate_redteam(models, args.out, prompts_path=args.prompts, judge=args.judge, config=config)
    print(format_comparison(report))
    if args.compare:
        print(format_differences(report))
    print(f"wrote {report['files']['json']}, {report['files']['markdown']}, {report['files']['png']}")
    return 0


def _cmd_perplexity(args: argparse.Namespace) -> int:
    from quintet.eval.perplexity import evaluate_perplexity

    result = evaluate_perplexity(
        args.model, args.data, args.max_length, args.batch_size, args.max_documents, args.lang, args.out
    )
    print(f"{'lang':<6}{'docs':>7}{'tokens':>10}{'bytes':>10}{'perplexity':>13}{'bits/byte':>11}")
    for lang, row in result["languages"].items():
        print(
            f"{lang:<6}{row['documents']:>7}{row['tokens']:>10}{row['bytes']:>10}"
            f"{row['perplexity']:>13.3f}{row['bits_per_byte']:>11.4f}"
        )
    return 0


def _cmd_mc(args: argparse.Namespace) -> int:
    from quintet.eval.multiple_choice import evaluate_mc_task

    result = evaluate_mc_task(args.model, args.task, args.batch_size, args.max_length, args.out)
    summary = {k: result[k] for k in ("model", "task", "n", "acc", "acc_norm", "by_language")}
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


def _cmd_lm_eval(args: argparse.Namespace) -> int:
    from quintet.eval.lm_eval_adapter import main

    rest = args.lm_eval_args[1:] if args.lm_eval_args[:1] == ["--"] else args.lm_eval_args
    return main(rest)


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


def _cmd_vision(args: argparse.Namespace) -> int:
    from quintet.data.procedural_images import make_dataset
    from quintet.eval.vision import evaluate
    from quintet.loading import load_model

    configure_logging()
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
    from quintet.eval.vision import predict_files

    predictions = predict_files(args.model, args.images, top_k=args.top_k, resolution=args.resolution)
    for p in predictions:
        if args.json:
            print(json.dumps({"image": p.path, "height": p.height, "width": p.width, "top": p.top}))
            continue
        ranked = ", ".join(f"{label} {100 * prob:.1f}%" for label, prob in p.top)
        print(f"{p.path} ({p.width}x{p.height}): {ranked}")
    return 0


def add_vision_eval_arguments(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("--model", required=True, help="model folder (config.json + model.safetensors)")
    ev.add_argument("--resolutions", required=True, type=_resolutions, help="pixels, e.g. 32,64,128,256")
    ev.add_argument("--data", default="procedural", help="'procedural' (held-out scenes) or an image folder")
    ev.add_argument("--num-images", type=int, default=500, help="procedural scenes evaluated")
    ev.add_argument("--seed", type=int, default=999_999, help="seed of the procedural evaluation scenes")
    ev.add_argument("--max-tokens", type=int, default=1 << 16, help="patch tokens per evaluation batch")
    ev.add_argument(
        "--skip-above-tokens", type=int, help="skip resolutions where the encoder sees more tokens"
    )
    ev.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ev.set_defaults(func=_cmd_vision)


def add_predict_arguments(pr: argparse.ArgumentParser) -> None:
    pr.add_argument("--model", required=True, help="model folder")
    pr.add_argument("images", nargs="+", help="image files (any size; PNG, JPEG, ...)")
    pr.add_argument("--top-k", type=int, default=3, help="classes printed per image")
    pr.add_argument("--resolution", type=int, help="resize to this square size first (default: native size)")
    pr.add_argument("--json", action="store_true", help="one JSON object per image")
    pr.set_defaults(func=_cmd_predict)


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `eval redteam | perplexity | mc | lm-eval | vision | predict` to the `quintet` command."""
    ev = subparsers.add_parser("eval", help="red-team, perplexity, multiple choice, lm-evaluation-harness")
    sub = ev.add_subparsers(dest="eval_command", required=True)

    red = sub.add_parser(
        "redteam",
        help="generate, judge and report harmful-compliance per category and language and over-refusal",
    )
    red.add_argument("--model", required=True, help="model folder")
    red.add_argument("--compare", help="a second model folder, reported side by side")
    red.add_argument("--out", default="runs/redteam", help="report folder (default runs/redteam)")
    red.add_argument("--prompts", help="red-team JSONL (default: the project's eval split)")
    red.add_argument("--limit", type=int, help="at most N prompts per kind x category x language")
    red.add_argument(
        "--judge",
        default="quintet",
        help="quintet (rules + classifier, default), rules, classifier, classifier:DIR, hf-classifier:DIR, "
        "hf-guard:DIR (local folders only)",
    )
    red.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit in tokens")
    red.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    red.add_argument("--seed", type=int, default=0, help="seed of the --limit slice")
    red.set_defaults(func=_cmd_redteam)

    ppl = sub.add_parser("perplexity", help="perplexity and bits-per-byte per language on held-out text")
    ppl.add_argument("--model", required=True, help="model folder")
    ppl.add_argument(
        "--data", required=True, nargs="+", help="a token-shard folder (its held-out split) or JSONL files"
    )
    ppl.add_argument("--lang", help="language of every JSONL row (default: each row's 'lang')")
    ppl.add_argument(
        "--max-length",
        type=int,
        default=1024,
        help="the model's input length in tokens, lm-eval's max_length (rolling windows of this many fed "
        "tokens)",
    )
    ppl.add_argument("--batch-size", type=int, default=4, help="windows scored together")
    ppl.add_argument("--max-documents", type=int, help="at most N documents per language")
    ppl.add_argument("--out", help="write the result as JSON")
    ppl.set_defaults(func=_cmd_perplexity)

    mc = sub.add_parser("mc", help="multiple-choice log-likelihood task from JSONL (acc, acc_norm)")
    mc.add_argument("--model", required=True, help="model folder")
    mc.add_argument("--task", required=True, help='JSONL: {"question", "choices", "answer", "lang"?}')
    mc.add_argument("--batch-size", type=int, default=8, help="choices scored together")
    mc.add_argument(
        "--max-length",
        type=int,
        default=1024,
        help="the model's input length in tokens, lm-eval's max_length (longer question + choice keep their "
        "last max_length + 1 tokens, all but the last fed)",
    )
    mc.add_argument("--out", help="write the result (with per-item scores) as JSON")
    mc.set_defaults(func=_cmd_mc)

    lm = sub.add_parser(
        "lm-eval",
        help="lm-evaluation-harness with the `quintet` model registered: quintet eval lm-eval -- --model "
        "quintet --model_args pretrained=DIR --tasks T [--include_path DIR]",
    )
    lm.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments for lm_eval")
    lm.set_defaults(func=_cmd_lm_eval)

    add_vision_eval_arguments(
        sub.add_parser("vision", help="ViTAR / ViT accuracy and counted FLOPs per resolution")
    )
    add_predict_arguments(
        sub.add_parser("predict", help="top-k classes of image files, each at its own size")
    )
    return ev
