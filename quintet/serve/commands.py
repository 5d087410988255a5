"""The `quintet serve` command: parse, call `quintet.serve.serve`."""

from __future__ import annotations

import argparse


def _cmd_serve(args: argparse.Namespace) -> int:
    from quintet.serve import serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        threads=args.threads,
        log_level=args.log_level,
        max_batch=args.max_batch,
        max_context=args.max_context,
        prefix_cache_mb=args.prefix_cache_mb,
        api_key=args.api_key,
        max_queue=args.max_queue,
        model_name=args.model_name,
        activations=args.activations,
    )
    return 0


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `serve` to the `quintet` command's sub-commands."""
    p = subparsers.add_parser(
        "serve", help="serve a model folder over an OpenAI-compatible HTTP API, with a chat page at /"
    )
    p.add_argument("model", help="model folder (float or FP4 Jamba)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (cache slots)")
    p.add_argument("--max-context", type=int, default=4096, help="prompt + answer tokens per request")
    p.add_argument("--prefix-cache-mb", type=float, default=256, help="prefix snapshots kept (0: off)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--model-name", help="the model id clients send (default: the folder's name)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--activations",
        choices=["float32", "int8"],
        help="FP4 folders: decode matmul inputs, int8 (the default on AVX2 / AVX-512 CPUs: integer dot "
        "products, as llama.cpp's Q4_0) or float32 (exact; the default elsewhere); docs/deploy.md",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="server log verbosity",
    )
    p.set_defaults(func=_cmd_serve)
    return p
