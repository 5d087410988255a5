"""`quintet eval ...`: red-team, perplexity, multiple choice, lm-eval. Thin: parse, call, print."""

from __future__ import annotations

import argparse
import json


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


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `eval redteam | perplexity | mc | lm-eval` to the `quintet` command."""
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
    red.add_argument("--max-new-tokens", type=int, default=64)
    red.add_argument("--batch-size", type=int, default=16)
    red.add_argument("--seed", type=int, default=0, help="seed of the --limit slice")
    red.set_defaults(func=_cmd_redteam)

    ppl = sub.add_parser("perplexity", help="perplexity and bits-per-byte per language on held-out text")
    ppl.add_argument("--model", required=True, help="model folder")
    ppl.add_argument(
        "--data", required=True, nargs="+", help="a token-shard folder (its held-out split) or JSONL files"
    )
    ppl.add_argument("--lang", help="language of every JSONL row (default: each row's 'lang')")
    ppl.add_argument("--max-length", type=int, default=1024, help="context window in tokens")
    ppl.add_argument("--batch-size", type=int, default=4)
    ppl.add_argument("--max-documents", type=int, help="at most N documents per language")
    ppl.add_argument("--out", help="write the result as JSON")
    ppl.set_defaults(func=_cmd_perplexity)

    mc = sub.add_parser("mc", help="multiple-choice log-likelihood task from JSONL (acc, acc_norm)")
    mc.add_argument("--model", required=True, help="model folder")
    mc.add_argument("--task", required=True, help='JSONL: {"question", "choices", "answer", "lang"?}')
    mc.add_argument("--batch-size", type=int, default=8)
    mc.add_argument("--max-length", type=int, default=1024)
    mc.add_argument("--out", help="write the result (with per-item scores) as JSON")
    mc.set_defaults(func=_cmd_mc)

    lm = sub.add_parser(
        "lm-eval",
        help="lm-evaluation-harness with the `quintet` model registered: quintet eval lm-eval -- --model "
        "quintet --model_args pretrained=DIR --tasks T [--include_path DIR]",
    )
    lm.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments for lm_eval")
    lm.set_defaults(func=_cmd_lm_eval)
    return ev
