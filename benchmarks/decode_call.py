"""The Python around a decode step: steps on a bound cache against every step through the full path.

    python benchmarks/decode_call.py [--model jamba-small] [--threads 1] [--prompt 512] [--steps 64]
                                     [--runs 6] [--work DIR] [--out runs/benchmarks/decode_call.json]

One process, one FP4 engine (`load_quantized`, its default decode activations), one cache. After a prompt,
greedy decode steps alternate between the two ways a step can be called: "bound" (the engine's call as a
user makes it, on a cache whose buffers the decode program holds from the step before: only the ids and
the position cross into C++) and "full path" (the same call with the binding dropped first: the plan checks
the cache, rebuilds and checks its buffer lists and passes them in, then binds them again). Alternating
every step puts both under the same host noise. Also, at the same cache position, the bare program call
(`DecodeProgram.step` with lists built once): what the kernels cost with no Python around them. Prints the
median microseconds per step of each, the differences, and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import markdown_table, set_threads, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="jamba-small")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--work", type=Path, help="keep the model folders here")
    ap.add_argument("--out", default="runs/benchmarks/decode_call.json")
    args = ap.parse_args()

    from quintet.deploy.convert import quantize_folder
    from quintet.deploy.quantized_folder import load_quantized
    from quintet.models.jamba.create import create_model

    set_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    work = args.work or Path(tmp.name)
    float_dir, fp4_dir = work / "float", work / "fp4"
    if not (float_dir / "config.json").is_file():
        create_model(args.model, float_dir, seed=0)
    if not (fp4_dir / "config.json").is_file():
        quantize_folder(float_dir, fp4_dir, group_size=64)
    engine = load_quantized(fp4_dir, max_cache_length=args.prompt + args.steps + 64)
    plan = engine.decode_plan
    prompt = torch.randint(
        3, engine.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0)
    )

    load_before = os.getloadavg()
    times: dict[str, list[float]] = {"bound": [], "full path": [], "bare program call": []}
    with torch.inference_mode():
        for round_ in range(args.runs + 1):  # round 0 warms up
            cache = engine.new_cache()
            tok = int(np.argmax(engine(prompt, cache=cache, logits_to_keep=1).logits[0, -1].numpy()))
            step = torch.empty(1, 1, dtype=torch.long)
            for i in range(args.steps):
                full = (i + round_) % 2 == 0
                if full:
                    plan._fast = None  # drop the binding: this step takes the full path (and binds again)
                start = time.perf_counter()
                step[0, 0] = tok
                tok = int(np.argmax(engine(step, cache=cache).logits[0, -1].numpy()))
                seconds = time.perf_counter() - start
                if round_:
                    times["full path" if full else "bound"].append(seconds)
            state = cache.decode_state(plan.mamba_layers, plan.attention_layers, 1)
            for _ in range(args.steps // 2):  # the kernels alone, at the cache's last position
                start = time.perf_counter()
                plan.program.step(step[:, 0], *state)
                seconds = time.perf_counter() - start
                if round_:
                    times["bare program call"].append(seconds)
    load_after = os.getloadavg()
    med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    rows = [
        {"call": k, "us per step": med[k], "above the bare call, us": med[k] - med["bare program call"]}
        for k in times
    ]
    print(f"model {args.model}, {args.threads} thread(s), prompt {args.prompt}, {engine.activations} decode")
    print(f"{args.steps} greedy steps alternating, {args.runs} rounds after a warm-up round; medians")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(markdown_table(rows, ["call", "us per step", "above the bare call, us"]))
    print(f"full path / bound: {med['full path'] / med['bound']:.3f}")
    write_results(args.out, "decode_call", rows, load_before=load_before[0], load_after=load_after[0])


if __name__ == "__main__":
    main()
