"""`quintet deploy quantize|plan`, and the deployment step of `make demo`. Thin: parse, call, print."""

from __future__ import annotations

import argparse
import json

from quintet.kernels.m0e4 import GROUP_SIZES


def _cmd_quantize(args: argparse.Namespace) -> int:
    from quintet.deploy.convert import quantize_folder

    summary = quantize_folder(
        args.model,
        args.out,
        group_size=args.group,
        gptq=args.gptq,
        gptq_samples=args.gptq_samples,
        gptq_seq_len=args.gptq_seq_len,
    )
    before, after = summary["bytes_before"], summary["bytes_after"]
    print(
        f"wrote {summary['out']}: {summary['modules_quantized']} modules in M0E4 "
        f"(group {summary['group_size']}, {summary['calibration']}), weights {before / 2**20:.1f} MiB -> "
        f"{after / 2**20:.1f} MiB ({after / before:.3f}x)"
    )
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from quintet.deploy.memory_plan import (
        format_plan,
        format_weights,
        load_engine_for_plan,
        parse_sizes,
        plan_model,
        weight_bytes,
        weight_bytes_per_token,
    )
    from quintet.deploy.quantized_folder import file_bytes

    sizes = [parse_sizes(s) for s in args.at] if args.at else None
    engine = load_engine_for_plan(args.model)
    kinds = tuple(args.kind or ("decode", "prefill"))
    plans = plan_model(args.model, kinds=kinds, batch=args.batch, engine=engine)
    if args.json:
        weights = {
            "in_memory": weight_bytes(engine),
            "files": file_bytes(args.model),
            "read_per_token": weight_bytes_per_token(engine),
        }
        print(json.dumps({"weights": weights, "steps": [p.to_dict(sizes) for p in plans]}, indent=2))
    else:
        print(format_weights(engine, args.model))
        print("\n\n".join(format_plan(p, sizes, verbose=args.verbose) for p in plans))
    return 0


def _cmd_export_gguf(args: argparse.Namespace) -> int:
    from quintet.deploy.gguf_export import export_gguf

    summary = export_gguf(args.model, args.out, type=args.type)
    print(
        f"wrote {summary['path']}: {summary['tensors']} tensors ({summary['quantized_tensors']} in "
        f"{summary['type']}), {summary['bytes'] / 2**20:.1f} MiB, vocabulary {summary['vocab']}"
    )
    return 0


def add_deploy_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `deploy` (with `quantize` and `plan`) to the `quintet` command's sub-commands."""
    deploy = subparsers.add_parser("deploy", help="quantize models to FP4 (M0E4) and plan their memory")
    sub = deploy.add_subparsers(dest="deploy_command", required=True)

    q = sub.add_parser("quantize", help="write an FP4 (M0E4) copy of a model folder")
    q.add_argument("model", help="float model folder (Jamba, ViTAR or ViT)")
    q.add_argument("--out", required=True, help="quantized model folder to write")
    q.add_argument(
        "--group", type=int, default=64, choices=GROUP_SIZES, help="weights per scale (default 64)"
    )
    q.add_argument("--gptq", metavar="CALIB.jsonl", help="calibrate with GPTQ on these documents (`text`)")
    q.add_argument("--gptq-samples", type=int, default=32, help="calibration sequences (default 32)")
    q.add_argument("--gptq-seq-len", type=int, default=256, help="tokens per calibration sequence")
    q.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("plan", help="symbolic shapes and the memory plan of a Jamba model's engine steps")
    p.add_argument("model", help="model folder (float: the float32 engine; quantized: the FP4 engine)")
    p.add_argument(
        "--at",
        action="append",
        metavar="b=1,L=1,P=1024",
        help="evaluate the plan at these sizes (batch b, new tokens L, past tokens P); repeatable",
    )
    p.add_argument(
        "--kind",
        action="append",
        choices=["decode", "prefill", "chunk"],
        help="step kinds to plan (default: decode and prefill); repeatable",
    )
    p.add_argument(
        "--batch", type=int, default=None, help="fix the batch size (default: 1 for decode, else b)"
    )
    p.add_argument("--verbose", action="store_true", help="list every buffer and every op's shapes")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_plan)

    g = sub.add_parser("export-gguf", help="write a GGUF file of a Jamba model for llama.cpp and Ollama")
    g.add_argument("model", help="Jamba model folder (float, or FP4: dequantized to float first)")
    g.add_argument("--out", required=True, metavar="FILE.gguf", help="GGUF file to write")
    g.add_argument(
        "--type", default="f32", help="f32 (default), q8_0 or q4_0: the type of the weight matrices"
    )
    g.set_defaults(func=_cmd_export_gguf)
    return deploy
