"""quintet against llama.cpp on the same weights: prefill and decode speed, bytes per token, roofline, memory.

    python benchmarks/vs_llamacpp.py [--model jamba-small] [--threads 1 2] [--prompts 512 2048]
                                     [--new-tokens 64] [--runs 3] [--out runs/benchmarks/vs_llamacpp.json]

Needs the `bench` extra (`pip install -e '.[bench]'`: llama-cpp-python, built from source by pip).

One process. The model is --model's preset with seed-0 weights (or --model-dir, a float Jamba folder); it
is quantized to M0E4 (group 64, round to nearest) and exported to GGUF F32, Q8_0 and Q4_0 with
`quintet deploy export-gguf`, so all six systems hold the same weights:
- quintet fp32: the float model in quintet's engine (`to_engine`, float32);
- quintet FP4: the M0E4 folder as a user loads it (`load_quantized`: 4-bit weights, quintet's M0E4
  kernels, the default decode activations: int8 where the kernels run AVX2 or AVX-512, llama.cpp's own
  trade for Q4_0, whose matmuls quantize activations to Q8_0; float32 elsewhere; the run prints which);
- quintet FP4 float32-act: the same with `activations="float32"` (exact to float32 rounding);
- llama.cpp F32 / Q8_0 / Q4_0: llama-cpp-python's `Llama` on the GGUF files, `eval` of token lists and
  the last row's logits read straight from the context (no sampler, no Python per vocabulary entry).
Every system picks its next token by the same NumPy argmax over a float32 view of those logits.
For each --threads and --prompts: prefill = tokens/s of one prompt into an empty cache; decode = tokens/s of
--new-tokens greedy steps after it. The systems are interleaved within each of --runs rounds (after one
warm-up round), medians reported, with the load average before and after.

Also, in the same run: the bytes of weights each system reads per decoded token (every tensor a token
touches: all dense weights, the chosen experts' share of the expert weights, one embedding row), a memory
bandwidth probe (one thread and all threads: a reduction over 512 MiB), the roofline = bandwidth / bytes
per token, and the resident memory of a loaded FP4 model (a fresh subprocess, RSS above the imports) against
its weights file plus its cache (a second copy loaded in the process: the first pays the libraries).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
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

from quintet.deploy.convert import quantize_folder  # noqa: E402
from quintet.deploy.engine import to_engine  # noqa: E402
from quintet.deploy.gguf_export import export_gguf  # noqa: E402
from quintet.deploy.huge_pages import huge_page_bytes, huge_pages_available  # noqa: E402
from quintet.deploy.memory_plan import weight_bytes_per_token  # noqa: E402
from quintet.deploy.memory_probe import resident_memory  # noqa: E402
from quintet.deploy.quantized_folder import (
    file_bytes,  # noqa: E402
    load_quantized,  # noqa: E402
)
from quintet.kernels import m0e4_cpu  # noqa: E402
from quintet.models.jamba import JambaForCausalLM  # noqa: E402
from quintet.models.jamba.create import create_model  # noqa: E402

GGUF_TYPES = ("f32", "q8_0", "q4_0")


# ---------------------------------------------------------------------------------------------- systems
def greedy(logits: np.ndarray) -> int:
    """The next token of both kinds of system, picked the same way from a float32 view of the last row's
    logits (NumPy's argmax: PyTorch's takes ~30 us for a 32k vocabulary on one core, a tenth of a token)."""
    return int(np.argmax(logits))


class QuintetSystem:
    def __init__(self, name: str, engine):
        self.name, self.engine = name, engine

    @torch.inference_mode()
    def run(self, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        ids = torch.tensor([prompt])
        cache = self.engine.new_cache()
        t0 = time.perf_counter()
        logits = self.engine(ids, cache=cache, logits_to_keep=1).logits
        tok = greedy(logits[0, -1].numpy())
        t1 = time.perf_counter()
        out = [tok]
        step = torch.empty(1, 1, dtype=torch.long)
        for _ in range(new_tokens - 1):
            step[0, 0] = tok
            tok = greedy(self.engine(step, cache=cache).logits[0, -1].numpy())
            out.append(tok)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, out


class LlamaCppSystem:
    def __init__(self, name: str, path: Path, threads: int, n_ctx: int):
        import llama_cpp

        self.name, self.llama_cpp = name, llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=512,
            n_ubatch=512,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=False,
            verbose=False,
        )
        self.vocab = self.llm.n_vocab()

    def _last_logits(self) -> np.ndarray:
        ptr = self.llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.vocab,))

    def run(self, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = greedy(self._last_logits())
        t1 = time.perf_counter()
        out = [tok]
        for _ in range(new_tokens - 1):
            llm.eval([tok])
            tok = greedy(self._last_logits())
            out.append(tok)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, out


# ---------------------------------------------------------------------------------------------- probes
def bandwidth_probe(threads: int, mib: int = 512, runs: int = 5) -> float:
    """Bytes/s of a float32 sum over `mib` MiB (memory-bound: one add per 4 bytes read), the best of a buffer
    in ordinary 4 KiB pages and one in 2 MiB pages (quintet's engine keeps its weights in huge pages, which
    spare the reads page walks: the roofline is the machine's best, whoever uses it)."""
    set_threads(threads)
    buffers = [torch.ones(mib * 2**20 // 4)]
    if huge_pages_available():
        buffers.append(huge_page_bytes(mib * 2**20).view(torch.float32).fill_(1.0))
    best = float("inf")
    for a in buffers:
        for _ in range(runs):
            t = time.perf_counter()
            a.sum()
            best = min(best, time.perf_counter() - t)
    del buffers
    return mib * 2**20 / best


def gguf_bytes_per_token(path: Path, experts: int, top_k: int) -> int:
    """Bytes of the GGUF tensors one decoded token reads: all, but a top_k / experts share of the expert
    tensors and one row of the token embedding."""
    import gguf

    total = 0
    for t in gguf.GGUFReader(str(path)).tensors:
        n = int(t.n_bytes)
        if "_exps" in t.name:
            n = n * top_k // experts
        elif t.name == "token_embd.weight":
            n = n // int(t.shape[-1])
        total += n
    return total


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="jamba-small")
    ap.add_argument("--model-dir", type=Path, help="a float Jamba folder (instead of --model's preset)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompts", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", type=Path, help="keep the model folders and GGUF files here")
    ap.add_argument("--out", default="runs/benchmarks/vs_llamacpp.json")
    args = ap.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("vs_llamacpp.py needs llama-cpp-python: pip install -e '.[bench]'")

    tmp = tempfile.TemporaryDirectory()
    work = args.work or Path(tmp.name)
    float_dir, fp4_dir = work / "float", work / "fp4"
    if args.model_dir:
        float_dir = args.model_dir
    elif not (float_dir / "config.json").is_file():
        create_model(args.model, float_dir, seed=0)
    if not (fp4_dir / "config.json").is_file():
        quantize_folder(float_dir, fp4_dir, group_size=64)
    ggufs = {}
    for kind in GGUF_TYPES:
        ggufs[kind] = work / f"model-{kind}.gguf"
        if not ggufs[kind].is_file():
            export_gguf(float_dir, ggufs[kind], kind)

    float_model = JambaForCausalLM.from_pretrained(float_dir)
    config = float_model.config
    experts, top_k = config.num_experts, config.num_experts_per_tok
    n_ctx = max(args.prompts) + args.new_tokens + 64
    fp4_engine = load_quantized(fp4_dir, max_cache_length=n_ctx)  # as a user loads it: default activations
    fp32_engine = to_engine(float_model, dtype=torch.float32, max_cache_length=n_ctx)
    exact_engine = load_quantized(fp4_dir, max_cache_length=n_ctx, activations="float32")
    per_token = {
        "quintet fp32": weight_bytes_per_token(fp32_engine),
        "quintet FP4": weight_bytes_per_token(fp4_engine),
        "quintet FP4 float32-act": weight_bytes_per_token(exact_engine),
        **{f"llama.cpp {k.upper()}": gguf_bytes_per_token(p, experts, top_k) for k, p in ggufs.items()},
    }
    files = {
        "quintet fp32": file_bytes(float_dir),
        "quintet FP4": file_bytes(fp4_dir),
        "quintet FP4 float32-act": file_bytes(fp4_dir),
        **{f"llama.cpp {k.upper()}": p.stat().st_size for k, p in ggufs.items()},
    }
    bandwidth = {t: bandwidth_probe(t) for t in sorted(set(args.threads))}
    memory = resident_memory(fp4_dir, n_ctx)

    gen = torch.Generator().manual_seed(0)
    rows, agree = [], {}
    load_before = os.getloadavg()
    for threads in args.threads:
        set_threads(threads)
        systems = [
            QuintetSystem("quintet fp32", fp32_engine),
            QuintetSystem("quintet FP4", fp4_engine),
            QuintetSystem("quintet FP4 float32-act", exact_engine),
            *(LlamaCppSystem(f"llama.cpp {k.upper()}", p, threads, n_ctx) for k, p in ggufs.items()),
        ]
        for prompt_len in args.prompts:
            prompt = torch.randint(3, config.vocab_size, (prompt_len,), generator=gen).tolist()
            times = {s.name: ([], []) for s in systems}
            for round_ in range(args.runs + 1):  # round 0 warms up
                for s in systems:
                    pre, dec, out = s.run(prompt, args.new_tokens)
                    if round_:
                        times[s.name][0].append(pre)
                        times[s.name][1].append(dec)
                    agree.setdefault((threads, prompt_len), {})[s.name] = out
            outs = agree[(threads, prompt_len)]
            for s in systems:
                pre, dec = (statistics.median(v) for v in times[s.name])
                decode = (args.new_tokens - 1) / dec
                rows.append(
                    {
                        "system": s.name,
                        "threads": threads,
                        "prompt": prompt_len,
                        "prefill tok/s": prompt_len / pre,
                        "decode tok/s": decode,
                        "file MiB": files[s.name] / 2**20,
                        "MB read/token": per_token[s.name] / 1e6,
                        "roofline tok/s": bandwidth[threads] / per_token[s.name],
                        "of roofline": decode * per_token[s.name] / bandwidth[threads],
                        "same tokens as fp32": outs[s.name] == outs["quintet fp32"],
                    }
                )
            del times
        del systems
        gc.collect()
    load_after = os.getloadavg()

    def ratio(a: str, b: str, col: str, threads: int, prompt: int) -> float:
        pick = {(r["system"], r["threads"], r["prompt"]): r[col] for r in rows}
        return pick[(a, threads, prompt)] / pick[(b, threads, prompt)]

    ratios = []
    for threads in args.threads:
        for prompt_len in args.prompts:
            ratios.append(
                {
                    "threads": threads,
                    "prompt": prompt_len,
                    "FP4 / Q4_0 decode": ratio(
                        "quintet FP4", "llama.cpp Q4_0", "decode tok/s", threads, prompt_len
                    ),
                    "FP4 float32-act / Q4_0 decode": ratio(
                        "quintet FP4 float32-act", "llama.cpp Q4_0", "decode tok/s", threads, prompt_len
                    ),
                    "FP4 / Q4_0 prefill": ratio(
                        "quintet FP4", "llama.cpp Q4_0", "prefill tok/s", threads, prompt_len
                    ),
                    "fp32 / F32 decode": ratio(
                        "quintet fp32", "llama.cpp F32", "decode tok/s", threads, prompt_len
                    ),
                    "fp32 / F32 prefill": ratio(
                        "quintet fp32", "llama.cpp F32", "prefill tok/s", threads, prompt_len
                    ),
                }
            )
    cols = ["system", "threads", "prompt", "prefill tok/s", "decode tok/s", "file MiB", "MB read/token"]
    cols += ["roofline tok/s", "of roofline", "same tokens as fp32"]
    print(f"model {args.model_dir or args.model}, {args.new_tokens} new tokens, median of {args.runs} rounds")
    print(
        f"M0E4 kernels: {m0e4_cpu.isa()}, prefill matmuls in {m0e4_cpu.matmul_dtype()}; quintet FP4's decode "
        f"activations (the default here): {fp4_engine.activations}"
    )
    print("bandwidth: " + ", ".join(f"{t} thread(s) {b / 1e9:.1f} GB/s" for t, b in bandwidth.items()))
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(markdown_table(rows, cols))
    print()
    print(markdown_table(ratios, list(ratios[0])))
    weights, cache_bytes = files["quintet FP4"], memory["cache_bytes"]
    loaded, long_prompt = memory["rss_loaded"], memory["rss_after_long_prompt"]
    print(
        f"\nFP4 resident memory: {loaded / 2**20:.1f} MiB for a loaded model (a 16-token prompt and 8 decode "
        f"steps; a second copy in the process, so the libraries and code generated on first use, "
        f"{memory['rss_first_copy'] / 2**20:.1f} MiB with the first copy, are not counted); weights file "
        f"{weights / 2**20:.1f} MiB + cache {cache_bytes / 2**20:.1f} MiB; (RSS - cache) / file = "
        f"{(loaded - cache_bytes) / weights:.3f}; after a {n_ctx - 128}-token prompt (its activations "
        f"kept by the allocator): {long_prompt / 2**20:.1f} MiB"
    )
    write_results(
        args.out,
        "vs_llamacpp",
        rows,
        ratios=ratios,
        bandwidth=bandwidth,
        memory={**memory, "weights_file": weights},
        load_average=[load_before, load_after],
        isa=m0e4_cpu.isa(),
        threads=args.threads,
        runs=args.runs,
    )
    tmp.cleanup()


if __name__ == "__main__":
    main()
