"""quintet's Jamba against transformers' JambaForCausalLM: the same jamba-small weights, one process.

    python benchmarks/jamba_vs_transformers.py [--threads 1] [--runs 5] [--lengths 512,2048,8192]
                                               [--new-tokens 128] [--out runs/benchmarks/jamba.json]

- prefill: tokens/s of one prompt of each length into an empty cache (last-token logits only, as in
  generation; ours feeds the prompt in 2048-token pieces, its default);
- decode: tokens/s of --new-tokens greedy tokens after a 512-token prompt, through each library's own
  generation (`transformers`' `generate`, quintet's `generate`), prefill time subtracted;
- peak memory: the resident-set growth while prefilling the longest prompt, each library measured in a
  fresh child process (peak RSS cannot be separated inside one process).
Timings are medians of --runs; the ratio column is transformers' time over ours.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import markdown_table, median_seconds, set_threads, write_results  # noqa: E402

from quintet.generation import generate, prefill  # noqa: E402
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


def _peak_rss_child(folder: str, which: str, length: int, threads: int, queue: mp.Queue) -> None:
    set_threads(threads)
    if which == "quintet":
        model, fn = JambaForCausalLM.from_pretrained(folder).eval(), prefill_ours
    else:
        model = transformers.JambaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        fn = prefill_theirs
    ids = torch.randint(3, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        fn(model, ids)
    queue.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)


def peak_prefill_bytes(folder: Path, which: str, length: int, threads: int) -> int:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_child, args=(str(folder), which, length, threads, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


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
            t_pre_ours = median_seconds(lambda: prefill_ours(ours, prompt), args.runs)
            t_pre_theirs = median_seconds(lambda: prefill_theirs(theirs, prompt), args.runs)
            t_gen_ours = median_seconds(
                lambda: generate(ours, prompt.tolist(), max_new_tokens=k, stop_token_ids=()),
                args.runs,
                warmup=0,
            )
            t_gen_theirs = median_seconds(
                lambda: theirs.generate(
                    prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0
                ),
                args.runs,
                warmup=0,
            )
            dec_ours, dec_theirs = k / (t_gen_ours - t_pre_ours), k / (t_gen_theirs - t_pre_theirs)
            rows.append(
                {
                    "measure": f"decode {k} tokens after 512 (tok/s)",
                    "quintet": dec_ours,
                    "transformers": dec_theirs,
                    "speedup": dec_ours / dec_theirs,
                }
            )

        longest = max(lengths)
        mem_ours = peak_prefill_bytes(folder, "quintet", longest, args.threads)
        mem_theirs = peak_prefill_bytes(folder, "transformers", longest, args.threads)
        rows.append(
            {
                "measure": f"peak memory growth, prefill {longest} (MiB)",
                "quintet": mem_ours / 2**20,
                "transformers": mem_theirs / 2**20,
                "speedup": mem_theirs / max(mem_ours, 1),
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
