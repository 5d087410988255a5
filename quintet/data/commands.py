"""`quintet data ...`: demo corpus, curation, tokenizer training, token shards. Thin: parse, call, print.

    quintet data demo-corpus --out runs/data/corpus
    quintet data curate configs/curation-demo.toml --data-root runs/data/corpus --out runs/data/curation
    quintet data tokenizer --data runs/data/curation/curated --out runs/data/tokenizer --vocab-size 4096
    quintet data tokenize --data runs/data/curation/curated --tokenizer runs/data/tokenizer \
        --out runs/data/shards

`run_data_demo(out_dir)` chains all four on the demo corpus (what `make demo` runs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "curation-demo.toml"


def _cmd_demo_corpus(args: argparse.Namespace) -> int:
    from quintet.data.demo_corpus import DemoCorpusConfig, generate_demo_corpus

    summary = generate_demo_corpus(args.out, DemoCorpusConfig(seed=args.seed))
    print(json.dumps({k: summary[k] for k in ("root", "documents", "counts", "labels")}, indent=2))
    return 0


def _cmd_curate(args: argparse.Namespace) -> int:
    from quintet.commands import configure_logging
    from quintet.data.curation import curate, curation_report

    configure_logging()  # each stage's steps, before its progress bar

    if args.report_only:
        result = curation_report(args.out)
    else:
        result = curate(args.config, args.out, data_root=args.data_root, quiet=not args.verbose)
    if result.stats is None:
        again = f"quintet data curate {args.config} --out {args.out} --report-only"
        print(f"stages submitted; when they have finished: {again}")
        return 0
    print(result.stats_paths["markdown"].read_text(), end="")
    print(f"\ncurated: {result.curated_dir}\nstats: {', '.join(str(p) for p in result.stats_paths.values())}")
    return 0


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    from quintet.data.tokenizer_training import train_tokenizer
    from quintet.tokenizer import HFTokenizer

    path = train_tokenizer(args.data, args.out, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    vocab = HFTokenizer(path).vocab_size  # what the file holds: fewer than asked when the corpus is small
    print(f"wrote {path} (vocab {vocab}) and {path.parent / 'tokenizer_config.json'}")
    return 0


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from quintet.data.shards import load_index, tokenize_curated

    path = tokenize_curated(
        args.data, args.tokenizer, args.out, sources=args.sources, heldout_fraction=args.heldout_fraction
    )
    index = load_index(path)
    for source, splits in index["sources"].items():
        counts = ", ".join(
            f"{split} {info['tokens']} tokens / {info['documents']} docs" for split, info in splits.items()
        )
        print(f"{source}: {counts}")
    print(f"wrote {path} ({index['dtype']})")
    return 0


def add_data_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `data` and its sub-commands to the `quintet` command's sub-parsers."""
    data = subparsers.add_parser("data", help="curate text, train a tokenizer, write token shards")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("demo-corpus", help="write the labelled multilingual demo corpus")
    p.add_argument("--out", type=Path, required=True, help="folder to write the corpus into")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated documents")
    p.set_defaults(func=_cmd_demo_corpus)

    p = sub.add_parser("curate", help="run a curation config (TOML or YAML) as datatrove pipelines")
    p.add_argument("config", type=Path, help="curation config file, e.g. configs/curation-demo.toml")
    p.add_argument("--out", type=Path, required=True, help="output folder (rerun the same to resume)")
    p.add_argument("--data-root", type=Path, default=None, help="input paths are relative to this folder")
    p.add_argument("--report-only", action="store_true", help="only rebuild the statistics of a finished run")
    p.add_argument("--verbose", action="store_true", help="show datatrove's per-file log lines")
    p.set_defaults(func=_cmd_curate)

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on curated data")
    p.add_argument("--data", type=Path, required=True, help="curated folder (<lang>/*.jsonl or .parquet)")
    p.add_argument(
        "--out", type=Path, required=True, help="folder for tokenizer.json and tokenizer_config.json"
    )
    p.add_argument(
        "--vocab-size", type=int, default=4096, help="tokens to learn, special tokens included (at most)"
    )
    p.add_argument("--min-frequency", type=int, default=2, help="a pair must occur this often to be merged")
    p.set_defaults(func=_cmd_tokenizer)

    p = sub.add_parser("tokenize", help="write uint16/uint32 token shards with a JSON index")
    p.add_argument("--data", type=Path, required=True, help="curated folder (<lang>/*.jsonl or .parquet)")
    p.add_argument("--tokenizer", type=Path, required=True, help="tokenizer.json or its folder")
    p.add_argument("--out", type=Path, required=True, help="folder for index.json and the shards")
    p.add_argument("--sources", nargs="+", default=None, help="curated subfolders to tokenize (default: all)")
    p.add_argument(
        "--heldout-fraction", type=float, default=0.05, help="share of documents in the held-out split"
    )
    p.set_defaults(func=_cmd_tokenize)
    return data
