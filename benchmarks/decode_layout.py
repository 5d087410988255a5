"""The M0E4 decode layout against the row layout: one FP4 model loaded twice, decode steps interleaved.

    python benchmarks/decode_layout.py [--model jamba-small] [--threads 1] [--prompts 512 2048]
                                       [--new-tokens 64] [--runs 8] [--isa avx512|avx2]
                                       [--work DIR] [--out runs/benchmarks/decode_layout.json]

One process. The model is --model's preset with seed-0 weights, quantized to M0E4 (group 64); it is
loaded as a user loads it (`load_quantized`, int8 decode activations), once in the decode layout (what
the engine chooses wherever the int8 GEMV runs vector code) and once kept in the row layout (the engine's
choice turned off for that load). Each round runs, for each engine, a prompt into an empty cache then
--new-tokens greedy steps (NumPy argmax), the two engines alternating; the decode time is the median over
--runs rounds after one warm-up round. Also the int8 GEMV alone on one weight of --kernel-rows x 512 (group
64, 2.3 MB at 8192 rows: it stays in the caches, so this is the kernel's arithmetic rate), the two layouts
alternating call by call. --isa forces the kernels' instruction set (`QUINTET_M0E4_ISA`) for both, to
measure the AVX2 kernels on an AVX-512 machine. Prints tok/s of each, GB/s of the kernel, the ratios and
the load average before and after.
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
    ap.add_argument("--prompts", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--isa", choices=["avx512", "avx2"], help="force the kernels' instruction set")
    ap.add_argument("--kernel-rows", type=int, default=8192)
    ap.add_argument("--work", type=Path, help="keep the model folders here")
    ap.add_argument("--out", default="runs/benchmarks/decode_layout.json")
    args = ap.parse_args()
    if args.isa:
        os.environ["QUINTET_M0E4_ISA"] = args.isa

    import quintet.deploy.engine as engine_module
    from quintet.deploy.convert import quantize_folder
    from quintet.deploy.qlinear import M0E4Linear
    from quintet.deploy.quantized_folder import load_quantized
    from quintet.kernels import m0e4_cpu
    from quintet.models.jamba.create import create_model

    set_threads(args.threads)
    if not m0e4_cpu.decode_layout_runs("int8"):
        sys.exit(f"the decode layout does not run here (kernels: {m0e4_cpu.isa()}): nothing to compare")
    tmp = tempfile.TemporaryDirectory()
    work = args.work or Path(tmp.name)
    float_dir, fp4_dir = work / "float", work / "fp4"
    if not (float_dir / "config.json").is_file():
        create_model(args.model, float_dir, seed=0)
    if not (fp4_dir / "config.json").is_file():
        quantize_folder(float_dir, fp4_dir, group_size=64)
    n_ctx = max(args.prompts) + args.new_tokens + 64
    engines = {"decode layout": load_quantized(fp4_dir, max_cache_length=n_ctx, activations="int8")}
    chosen = engine_module.decode_layout_runs
    engine_module.decode_layout_runs = lambda activations: False
    try:
        engines["row layout"] = load_quantized(fp4_dir, max_cache_length=n_ctx, activations="int8")
    finally:
        engine_module.decode_layout_runs = chosen
    for name, engine in engines.items():
        tiled = {m.qweight.dim() == 3 for m in engine.modules() if isinstance(m, M0E4Linear)}
        assert (True in tiled) == (name == "decode layout"), f"{name}: layouts {tiled}"
    vocab = engines["decode layout"].config.vocab_size

    @torch.inference_mode()
    def decode(engine, prompt: torch.Tensor) -> float:
        cache = engine.new_cache()
        tok = int(np.argmax(engine(prompt, cache=cache, logits_to_keep=1).logits[0, -1].numpy()))
        step = torch.empty(1, 1, dtype=torch.long)
        start = time.perf_counter()
        for _ in range(args.new_tokens):
            step[0, 0] = tok
            tok = int(np.argmax(engine(step, cache=cache).logits[0, -1].numpy()))
        return time.perf_counter() - start

    load_before = os.getloadavg()
    rows = []
    gen = torch.Generator().manual_seed(0)
    for prompt_len in args.prompts:
        prompt = torch.randint(3, vocab, (1, prompt_len), generator=gen)
        times: dict[str, list[float]] = {name: [] for name in engines}
        for round_ in range(args.runs + 1):  # round 0 warms up
            for name, engine in engines.items():
                seconds = decode(engine, prompt)
                if round_:
                    times[name].append(seconds)
        tok_s = {name: args.new_tokens / statistics.median(t) for name, t in times.items()}
        rows.append(
            {
                "prompt": prompt_len,
                "decode layout tok/s": tok_s["decode layout"],
                "row layout tok/s": tok_s["row layout"],
                "ratio": tok_s["decode layout"] / tok_s["row layout"],
            }
        )
    ops, code = m0e4_cpu._kernel.get(), m0e4_cpu.ISAS.index(m0e4_cpu.isa())
    q = torch.randint(0, 256, (args.kernel_rows, 256), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(args.kernel_rows, 8, generator=gen) * 0.01).half()
    offsets = (torch.rand(args.kernel_rows, 8, generator=gen) + 1).half()
    tiled = m0e4_cpu.to_decode_layout(q, scales, offsets)
    weights = {"row layout": (q, scales, offsets), "decode layout": tiled}
    x = torch.randn(1, 512, generator=gen)
    calls: dict[str, list[float]] = {name: [] for name in weights}
    for i in range(2000):
        for name, w in weights.items():
            start = time.perf_counter()
            ops.gemv_q8(x, *w, 64, code)
            if i >= 100:
                calls[name].append(time.perf_counter() - start)
    nbytes = q.numel() + 4 * scales.numel()
    gbs = {name: nbytes / statistics.median(t) / 1e9 for name, t in calls.items()}
    load_after = os.getloadavg()
    print(f"model {args.model}, {args.threads} thread(s), kernels {m0e4_cpu.isa()}, int8 decode activations,")
    print(f"{args.new_tokens} greedy tokens, median of {args.runs} interleaved rounds")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(markdown_table(rows, ["prompt", "decode layout tok/s", "row layout tok/s", "ratio"]))
    print(
        f"int8 GEMV alone, {args.kernel_rows} x 512 weight from the caches (one call of Python around each): "
        f"decode layout {gbs['decode layout']:.1f} GB/s, row layout {gbs['row layout']:.1f} GB/s, "
        f"{gbs['decode layout'] / gbs['row layout']:.2f}x"
    )
    write_results(
        args.out,
        "decode_layout",
        rows,
        model=args.model,
        isa=m0e4_cpu.isa(),
        kernel_gb_s=gbs,
        load_before=load_before[0],
        load_after=load_after[0],
    )


if __name__ == "__main__":
    main()
