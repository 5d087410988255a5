"""The `quintet` command: one sub-command per stage. Thin: parse, call the library, print."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from quintet import __version__
from quintet.commands import add_debug_flag, configure_logging, run_command, show_defaults


def _cmd_model_init(args: argparse.Namespace) -> int:
    from quintet.models.jamba.create import create_model
    from quintet.models.jamba.info import format_info, model_info

    model = create_model(args.preset, args.out, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {args.preset} to {args.out}")
    print(format_info(model_info(model.config)))
    return 0


def _cmd_model_info(args: argparse.Namespace) -> int:
    from quintet.models.jamba import JambaConfig
    from quintet.models.jamba.info import format_info, model_info

    if (args.model is None) == (args.preset is None):
        raise ValueError("model info: give a model folder or --preset NAME (one of them)")
    config = JambaConfig.from_preset(args.preset) if args.preset else JambaConfig.from_pretrained(args.model)
    info = model_info(config, context_length=args.context, dtype=args.dtype, batch_size=args.batch)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from quintet.generation import GenerationConfig, generate, stream_text
    from quintet.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model, args.activations)  # FP4 folder: the engine
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature != 0 else 1.0,  # a negative one is refused
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        vocab_limit=min(tokenizer.vocab_size, model.config.vocab_size),
    )
    if len(args.prompt) == 1:
        sys.stdout.write(args.prompt[0])
        for piece in stream_text(model, tokenizer, args.prompt[0], config):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    for i, prompt in enumerate(args.prompt):
        if not prompt:
            raise ValueError(f"--prompt number {i + 1} is empty; give at least one character")
    outputs = generate(model, [tokenizer.encode(p) for p in args.prompt], config)
    for prompt, ids in zip(args.prompt, outputs, strict=True):
        print(json.dumps({"prompt": prompt, "completion": tokenizer.decode(ids)}, ensure_ascii=False))
    return 0


def _cmd_align(args: argparse.Namespace) -> int:
    from quintet.align import run

    configure_logging()  # what it is doing before the first progress bar (reference log-probs, ...)

    summary = {"sft": run.run_sft, "dpo": run.run_dpo, "sdpo": run.run_sdpo}[args.align_command](args.config)
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


def add_vitar_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`quintet vitar train | eval | predict`: the vision commands under one name, the same calls as
    `train vision` (except that `vitar train` resumes unless --fresh), `eval vision` and `eval predict`."""
    from quintet.eval.commands import add_predict_arguments, add_vision_eval_arguments
    from quintet.train.commands import add_vision_train_arguments, train_vision_command

    vitar = subparsers.add_parser("vitar", help="ViTAR: train, evaluate across resolutions, classify images")
    sub = vitar.add_subparsers(dest="vitar_command", required=True)
    train = sub.add_parser("train", help="multi-resolution training from a TOML config (resumes if it can)")
    add_vision_train_arguments(train)
    train.add_argument("--fresh", action="store_true", help="refuse to resume an existing checkpoint")
    train.set_defaults(func=lambda args: train_vision_command(args, resume=not args.fresh))
    add_vision_eval_arguments(sub.add_parser("eval", help="accuracy and counted FLOPs per resolution"))
    add_predict_arguments(
        sub.add_parser("predict", help="top-k classes of image files, each at its own size")
    )
    return vitar


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quintet", description=__doc__)
    parser.add_argument("--version", action="version", version=f"quintet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="create and inspect Jamba models").add_subparsers(
        dest="model_command", required=True
    )
    init = model.add_parser("init", help="write a freshly initialised model folder from a preset")
    init.add_argument("--preset", required=True, help="jamba-tiny, jamba-small or jamba-v0.1")
    init.add_argument("--out", required=True, help="model folder to write")
    init.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    init.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a model already in --out (its weights, config and tokenizer files are removed first)",
    )
    init.set_defaults(func=_cmd_model_init)

    info = model.add_parser("info", help="parameters, layout, cache memory of a model folder or preset")
    info.add_argument("model", nargs="?", help="model folder (with config.json)")
    info.add_argument("--preset", help="a preset name instead of a folder")
    info.add_argument("--context", type=int, default=262144, help="context length in tokens (default 256K)")
    info.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["float32", "bfloat16", "float16"],
        help="dtype the weights and the cache are counted in",
    )
    info.add_argument("--batch", type=int, default=1, help="sequences whose cache is counted")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=_cmd_model_info)

    gen = sub.add_parser("generate", help="generate text from a model folder")
    gen.add_argument("--model", required=True, help="model folder")
    gen.add_argument("--prompt", required=True, action="append", help="prompt text; repeat for a batch")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature, >= 0; 0 = greedy")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set with this mass")
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    gen.add_argument(
        "--activations",
        choices=["float32", "int8"],
        help="FP4 folders: decode matmul inputs, int8 (the default on AVX2 / AVX-512 CPUs: integer dot "
        "products, as llama.cpp's Q4_0) or float32 (exact; the default elsewhere); docs/deploy.md",
    )
    gen.set_defaults(func=_cmd_generate)

    align = sub.add_parser("align", help="SFT, DPO and stepwise DPO").add_subparsers(
        dest="align_command", required=True
    )
    for name, text in (("sft", "supervised fine-tuning"), ("dpo", "DPO"), ("sdpo", "stepwise DPO (sDPO)")):
        cmd = align.add_parser(name, help=text)
        cmd.add_argument("config", help="alignment TOML")
        cmd.set_defaults(func=_cmd_align)

    # Each stage's own sub-commands, defined beside the stage.
    from quintet.data.commands import add_data_parser
    from quintet.deploy.commands import add_deploy_parser
    from quintet.eval.commands import add_eval_parser
    from quintet.safety.commands import add_safety_parser
    from quintet.serve.commands import add_serve_parser
    from quintet.train.commands import add_train_parser

    stages = (add_train_parser, add_data_parser, add_safety_parser, add_eval_parser, add_deploy_parser)
    for add in (*stages, add_serve_parser, add_vitar_parser):
        add(sub)
    add_debug_flag(parser)
    show_defaults(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
