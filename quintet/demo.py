"""`make demo`: the pipeline so far, end to end on data the project makes itself.

    python -m quintet.demo [--out runs/demo] [--preset jamba-small]

Stages: build a Jamba model and print its size, layout and cache memory; generate from it. Each later
stage of the lifecycle (curation, pretraining, alignment, red-teaming, deployment, ViTAR) adds its step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from quintet.generation import GenerationConfig, stream_text
from quintet.models.jamba.create import create_model
from quintet.models.jamba.info import format_info, model_info
from quintet.tokenizer import load_tokenizer


def _banner(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def jamba_model_stage(out: Path, preset: str) -> None:
    _banner(f"Jamba: build {preset} and save it to {out}")
    model = create_model(preset, out, seed=0)
    print(format_info(model_info(model.config)))
    _banner("Jamba at the paper's shape (jamba-v0.1), counted from its config")
    from quintet.models.jamba import JambaConfig

    print(format_info(model_info(JambaConfig.from_preset("jamba-v0.1"))))

    _banner("generate (an untrained model: random bytes, until the training stages land)")
    tokenizer = load_tokenizer(out, vocab_size=model.config.vocab_size)
    start = time.perf_counter()
    count = 0
    print("Hello, Jamba", end="")
    for piece in stream_text(
        model, tokenizer, "Hello, Jamba", GenerationConfig(max_new_tokens=48, stop_token_ids=())
    ):
        count += 1
        print(repr(piece)[1:-1], end="", flush=True)
    print(f"\n({count} pieces in {time.perf_counter() - start:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--preset", default="jamba-small")
    args = parser.parse_args(argv)
    jamba_model_stage(args.out / "jamba", args.preset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
