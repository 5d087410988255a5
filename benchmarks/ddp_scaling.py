"""Training throughput of 1 process against 2 DDP processes (torchrun, gloo) on this machine's CPU cores,
with the same global batch, model and token shards.

    python benchmarks/ddp_scaling.py [--steps 12] [--seq 128] [--global-batch 16] [--out FILE.json]

Both runs use `quintet train lm` itself; tokens/s is the median of the per-step figures it logs, after
the first two steps. Each process uses one thread, so 2 processes use both cores of a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import markdown_table, write_results  # noqa: E402

from quintet.data.shards import tokenize_curated  # noqa: E402
from quintet.data.tokenizer_training import train_tokenizer  # noqa: E402

WORDS = "the cat sat on a mat and the dog ran to the park while birds sang in trees".split()


def make_shards(root: Path) -> Path:
    rng = random.Random(0)
    folder = root / "curated" / "en"
    folder.mkdir(parents=True)
    rows = [{"id": str(i), "text": " ".join(rng.choice(WORDS) for _ in range(200))} for i in range(200)]
    (folder / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_tokenizer(root / "curated", root / "tok", vocab_size=400, min_frequency=1)
    return tokenize_curated(root / "curated", tok, root / "shards").parent


def config(root: Path, shards: Path, name: str, micro: int, steps: int, seq: int) -> Path:
    tokens = steps * seq * micro * (2 if name == "two" else 1)
    text = (
        f'[model]\npreset = "jamba-tiny"\n[data]\nshards = "{shards}"\nseq_len = {seq}\n'
        f"[optim]\nmicro_batch_size = {micro}\n"
        f'[run]\nout_dir = "{root / name}"\ncheckpoint_every = 100000\nheldout_tokens = {seq}\n'
        f'[[stages]]\nname = "A"\ntokens = {tokens}\nmixture = {{ en = 1.0 }}\n'
    )
    path = root / f"{name}.toml"
    path.write_text(text)
    return path


def tokens_per_s(out: Path) -> float:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 2)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--out", default="runs/benchmarks/ddp_scaling.json")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = make_shards(root)
        one = config(root, shards, "one", args.global_batch, args.steps, args.seq)
        two = config(root, shards, "two", args.global_batch // 2, args.steps, args.seq)
        subprocess.run(
            [sys.executable, "-m", "quintet.train", "lm", str(one)], check=True, env=env, capture_output=True
        )
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                "2",
                "-m",
                "quintet.train",
                "lm",
                str(two),
            ],
            check=True,
            env=env,
            capture_output=True,
        )
        t1, t2 = tokens_per_s(root / "one"), tokens_per_s(root / "two")
    rows = [
        {"processes": 1, "threads each": 1, "tokens/s": t1, "vs 1 process": 1.0},
        {"processes": 2, "threads each": 1, "tokens/s": t2, "vs 1 process": t2 / t1},
    ]
    print(
        f"jamba-tiny, global batch {args.global_batch} x {args.seq} tokens, {args.steps} steps, "
        f"median tokens/s after step 2, {os.cpu_count()} cores"
    )
    print(markdown_table(rows, list(rows[0])))
    write_results(
        args.out, "ddp_scaling", rows, steps=args.steps, seq=args.seq, global_batch=args.global_batch
    )


if __name__ == "__main__":
    main()
