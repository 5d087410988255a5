"""The `quintet` command: one sub-command per stage. Thin: parse, call the library, print."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from quintet import __version__


def _cmd_model_init(args: argparse.Namespace) -> int:
    from quintet.models.jamba.create import create_model
    from quintet.models.jamba.info import format_info, model_info

    model = create_model(args.preset, args.out, seed=args.seed)
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

    model, tokenizer = load_model_and_tokenizer(args.model)  # the FP4 engine when the folder is quantized
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0,
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

    summary = {"sft": run.run_sft, "dpo": run.run_dpo, "sdpo": run.run_sdpo}[args.align_command](args.config)
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


def _cmd_train_lm(args: argparse.Namespace) -> int:
    from quintet.train.lm import train_lm
    from quintet.train.lm_config import TrainConfig

    result = train_lm(TrainConfig.from_file(args.config), resume=args.resume)
    print(
        json.dumps(
            {
                "final_model": str(result.final_model),
                "metrics": str(result.metrics),
                "step": result.state.step,
                "stages": result.state.history,
            },
            indent=2,
        )
    )
    return 0


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
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(func=_cmd_model_init)

    info = model.add_parser("info", help="parameters, layout, cache memory of a model folder or preset")
    info.add_argument("model", nargs="?", help="model folder (with config.json)")
    info.add_argument("--preset", help="a preset name instead of a folder")
    info.add_argument("--context", type=int, default=262144, help="context length in tokens (default 256K)")
    info.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    info.add_argument("--batch", type=int, default=1)
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=_cmd_model_info)

    gen = sub.add_parser("generate", help="generate text from a model folder")
    gen.add_argument("--model", required=True, help="model folder")
    gen.add_argument("--prompt", required=True, action="append", help="prompt text; repeat for a batch")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=_cmd_generate)

    train = sub.add_parser("train", help="train models").add_subparsers(dest="train_command", required=True)
    lm = train.add_parser(
        "lm", help="pretrain a Jamba model through a curriculum (torchrun for several processes)"
    )
    lm.add_argument("config", help="training TOML")
    lm.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    lm.set_defaults(func=_cmd_train_lm)

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
    from quintet.models.vitar.commands import add_vitar_parser
    from quintet.safety.commands import add_safety_parser
    from quintet.serve.commands import add_serve_parser

    adders = (add_data_parser, add_safety_parser, add_eval_parser, add_deploy_parser, add_serve_parser)
    for add in (*adders, add_vitar_parser):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"quintet: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
