"""quintet's Jamba against transformers' JambaForCausalLM: the same jamba-small weights, one process.

    python benchmarks/jamba_vs_transformers.py [--threads 1] [--runs 5] [--lengths 512,2048,8192]
                                               [--new-tokens 128] [--out runs/benchmarks/jamba.json]

- prefill: tokens/s of one prompt of each length into an empty cache (last-token logits only, as in
  generation; ours feeds the prompt in 2048-token pieces, its default);
- decode: tokens/s of --new-tokens greedy tokens after a 512-token prompt, through each library's own
  generation (`transformers`' `generate` with a streamer, quintet's `stream_generate`), timed from the
  first new token (which ends the prefill) to the last;
- decode floor: the time to read the weights a token needs (the active linear layers, top-k experts
  only, each applied to one row), the bound on decode speed at batch 1 for both libraries: decode at
  batch 1 is memory-bound, so the best either library can do is that floor;
- peak memory: the peak resident set while prefilling the longest prompt, above the resident set after
  loading and a 64-token warm-up, each library in a fresh child process; the peak is reset before the
  prefill (Linux /proc/self/clear_refs) so the load's own transient peak does not hide the prefill's.
Timings are medians of --runs; the ratio column is transformers' time (or memory) over ours.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import markdown_table, median_seconds, set_threads, write_results  # noqa: E402

from quintet.generation import generate, prefill, stream_generate  # noqa: E402
from quintet.models.jamba import JambaForCausalLM  # noqa: E402
from quintet.models.jamba.create import create_model  # noqa: E402


def load_both(folder: Path) -> tuple[JambaForCausalLM, transformers.JambaForCausalLM]:
    ours = JambaForCausalLM.from_pretrained(folder).eval()
    theirs = transformers.JambaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return ours, theirs


def prefill_ours(model: JambaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    return prefill(model, ids, None, model.new_cache())


def prefill_theirs(model: transformers.JambaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, use_cache=True, logits_to_keep=1).logits


def decode_step_seconds_ours(model: JambaForCausalLM, prompt: torch.Tensor, k: int) -> float:
    """Mean seconds per decoded token over tokens 2..k of quintet's `stream_generate` (the first token
    comes out of the prefill)."""
    stamps = [
        time.perf_counter()
        for _ in stream_generate(model, prompt.tolist(), max_new_tokens=k, stop_token_ids=())
    ]
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


class _Stamps(BaseStreamer):
    """Notes the time of each `put`: transformers' generate puts the prompt, then each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def decode_step_seconds_theirs(model: transformers.JambaForCausalLM, prompt: torch.Tensor, k: int) -> float:
    """Mean seconds per decoded token over tokens 2..k of transformers' `generate`."""
    stamps = _Stamps()
    model.generate(
        prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0, streamer=stamps
    )
    new = stamps.times[1:]  # [0] is the prompt
    return (new[-1] - new[0]) / (len(new) - 1)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_rss_child(folder: str, which: str, length: int, threads: int, queue: mp.Queue) -> None:
    set_threads(threads)
    if which == "quintet":
        model, fn = JambaForCausalLM.from_pretrained(folder).eval(), prefill_ours
    else:
        model = transformers.JambaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        fn = prefill_theirs
    ids = torch.randint(3, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # warm up: kernels loaded, libraries' one-time buffers allocated
        fn(model, ids[:, :64])
    gc.collect()
    with contextlib.suppress(OSError):  # hand freed load buffers back to the OS: both start from weights
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        base = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        with torch.inference_mode():
            fn(model, ids)
        queue.put(((_status_kib("VmHWM") - base) * 1024, base * 1024))
    except OSError:  # not Linux: the growth of the lifetime peak, a lower bound
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with torch.inference_mode():
            fn(model, ids)
        queue.put(((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024, 0))


def peak_prefill_bytes(folder: Path, which: str, length: int, threads: int) -> tuple[int, int]:
    """(peak growth over the loaded model, resident bytes after loading) of one prefill of `length`."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_child, args=(str(folder), which, length, threads, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def decode_floor_seconds(model: JambaForCausalLM, runs: int) -> float:
    """Seconds to apply, to one row each, the linear layers one decoded token reads (top-k experts)."""
    k = model.config.num_experts_per_tok
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            parts = name.split(".")
            if "experts" in parts and int(parts[parts.index("experts") + 1]) >= k:
                continue  # k experts per MoE layer are read per token; which k does not matter
            layers.append((module, torch.randn(1, module.in_features)))

    def read_all() -> None:
        for module, x in layers:
            module(x)

    return median_seconds(read_all, max(runs, 5) * 4)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", default="runs/benchmarks/jamba_vs_transformers.json")
    args = parser.parse_args()
    set_threads(args.threads)
    lengths = [int(n) for n in args.lengths.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "jamba-small"
        create_model("jamba-small", folder, seed=0)
        ours, theirs = load_both(folder)
        vocab = ours.config.vocab_size
        rows = []
        with torch.inference_mode():
            for n in lengths:
                ids = torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(n))
                torch.testing.assert_close(
                    prefill_ours(ours, ids)[:, -1], prefill_theirs(theirs, ids)[:, -1], atol=1e-3, rtol=1e-3
                )
                runs = args.runs if n <= 2048 else max(3, args.runs // 2)
                t_ours = median_seconds(lambda ids=ids: prefill_ours(ours, ids), runs, warmup=0)
                t_theirs = median_seconds(lambda ids=ids: prefill_theirs(theirs, ids), runs, warmup=0)
                rows.append(
                    {
                        "measure": f"prefill {n} tokens (tok/s)",
                        "quintet": n / t_ours,
                        "transformers": n / t_theirs,
                        "speedup": t_theirs / t_ours,
                    }
                )

            prompt = torch.randint(3, vocab, (1, 512), generator=torch.Generator().manual_seed(1))
            k = args.new_tokens
            ours_tokens = generate(ours, prompt.tolist(), max_new_tokens=k, stop_token_ids=())[0]
            theirs_tokens = theirs.generate(
                prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0
            )[0, 512:].tolist()
            same = sum(a == b for a, b in zip(ours_tokens, theirs_tokens, strict=False))
            t_step_ours = statistics.median(
                decode_step_seconds_ours(ours, prompt, k) for _ in range(args.runs)
            )
            t_step_theirs = statistics.median(
                decode_step_seconds_theirs(theirs, prompt, k) for _ in range(args.runs)
            )
            dec_ours, dec_theirs = 1 / t_step_ours, 1 / t_step_theirs
            rows.append(
                {
                    "measure": f"decode {k} tokens after 512 (tok/s)",
                    "quintet": dec_ours,
                    "transformers": dec_theirs,
                    "speedup": dec_ours / dec_theirs,
                }
            )
            floor = decode_floor_seconds(ours, args.runs)
            rows.append(
                {
                    "measure": f"decode time per token / weight-read floor ({floor * 1e3:.1f} ms)",
                    "quintet": 1 / dec_ours / floor,
                    "transformers": 1 / dec_theirs / floor,
                    "speedup": dec_ours / dec_theirs,
                }
            )

        longest = max(lengths)
        (mem_ours, loaded_ours), (mem_theirs, loaded_theirs) = (
            peak_prefill_bytes(folder, which, longest, args.threads) for which in ("quintet", "transformers")
        )
        rows.append(
            {
                "measure": f"peak memory above the loaded model, prefill {longest} (MiB)",
                "quintet": mem_ours / 2**20,
                "transformers": mem_theirs / 2**20,
                "speedup": mem_theirs / max(mem_ours, 1),
            }
        )
        rows.append(
            {
                "measure": f"peak resident memory, prefill {longest} (MiB)",
                "quintet": (mem_ours + loaded_ours) / 2**20,
                "transformers": (mem_theirs + loaded_theirs) / 2**20,
                "speedup": (mem_theirs + loaded_theirs) / max(mem_ours + loaded_ours, 1),
            }
        )

    print(
        f"jamba-small (103M), fp32, batch 1, threads={args.threads}, median of {args.runs} "
        f"(3 for prompts > 2048); greedy tokens identical to transformers: {same}/{k}"
    )
    print(markdown_table(rows, ["measure", "quintet", "transformers", "speedup"]))
    write_results(
        args.out,
        "jamba_vs_transformers",
        rows,
        threads=args.threads,
        runs=args.runs,
        identical_greedy_tokens=f"{same}/{k}",
    )


if __name__ == "__main__":
    main()
