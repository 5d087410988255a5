"""Training throughput (forward + backward + AdamW step) of quintet's Jamba against transformers'
JambaForCausalLM on the same config, weights, batch and threads.

    python benchmarks/train_throughput.py [--preset jamba-tiny] [--batch 4] [--seq 256] [--threads 1]
                                          [--runs 5] [--out runs/benchmarks/train_throughput.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import markdown_table, median_seconds, set_threads, write_results  # noqa: E402

from quintet.models.jamba import JambaForCausalLM  # noqa: E402
from quintet.models.jamba.create import create_model  # noqa: E402


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    out = model(ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="jamba-tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default="runs/benchmarks/train_throughput.json")
    args = parser.parse_args()
    set_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        create_model(args.preset, Path(tmp) / "m", seed=0)
        ours = JambaForCausalLM.from_pretrained(Path(tmp) / "m").train()
        theirs = transformers.JambaForCausalLM.from_pretrained(Path(tmp) / "m", dtype=torch.float32).train()
    ids = torch.randint(
        3, ours.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        a = ours(ids, labels=ids, output_router_logits=True).loss
        b = theirs(ids, labels=ids, output_router_logits=True).loss
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4)
    t_ours = median_seconds(lambda: train_step(ours, opt_ours, ids), args.runs)
    t_theirs = median_seconds(lambda: train_step(theirs, opt_theirs, ids), args.runs)
    tokens = args.batch * args.seq
    rows = [
        {"library": "quintet", "tokens/s": tokens / t_ours, "s/step": t_ours, "speedup": t_theirs / t_ours},
        {"library": "transformers", "tokens/s": tokens / t_theirs, "s/step": t_theirs, "speedup": 1.0},
    ]
    print(
        f"{args.preset}, fp32, batch {args.batch} x {args.seq} tokens, threads={args.threads}, "
        f"median of {args.runs} steps (forward + backward + AdamW)"
    )
    print(markdown_table(rows, ["library", "tokens/s", "s/step", "speedup"]))
    write_results(
        args.out,
        "train_throughput",
        rows,
        preset=args.preset,
        batch=args.batch,
        seq=args.seq,
        threads=args.threads,
        runs=args.runs,
    )


if __name__ == "__main__":
    main()
