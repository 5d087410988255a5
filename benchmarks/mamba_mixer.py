"""The Jamba Mamba mixer at inference: the fused kernels against the same mixer built from PyTorch ops.

    python benchmarks/mamba_mixer.py [--threads 1] [--runs 5] [--steps 200] [--out runs/benchmarks/mixer.json]

One jamba-small mixer (hidden 512, d_inner 1024, d_state 16, d_conv 4), one set of weights and inputs, one
process. "fused" is the mixer as quintet runs it: prefill through `causal_conv1d_silu_fused` and the fused
scan, decode through `mamba_mixer_step_fused`. "PyTorch ops" is the same module with those two inference
kernels switched off (Conv1d, the x_proj/dt_proj/norm ops and the fused one-step SSM update, as before the
kernels existed). Outputs are checked equal first. Rows:
- prefill: one mixer forward over L tokens into an empty cache, median of --runs;
- decode: one token with a cache after a 512-token prompt, median over --steps consecutive tokens, in
  microseconds, with the mixer's three projections (in_proj, out_proj; x_proj inside) included.
The ratio is the PyTorch-ops time over the fused time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import markdown_table, median_seconds, set_threads, write_results  # noqa: E402

from quintet.kernels import selective_scan_cpu as fused  # noqa: E402
from quintet.models.jamba import JambaForCausalLM  # noqa: E402
from quintet.models.jamba.cache import HybridCache  # noqa: E402
from quintet.models.jamba.configuration import JambaConfig  # noqa: E402
from quintet.models.jamba.mamba import JambaMambaMixer  # noqa: E402

_AVAILABLE = fused.inference_kernels_available


def use_kernels(on: bool) -> None:
    """Switch the inference kernels on or off for the mixer (the scan itself stays fused in both)."""
    fused.inference_kernels_available = _AVAILABLE if on else (lambda *tensors: False)


def prefill_seconds(mixer: JambaMambaMixer, config: JambaConfig, h: torch.Tensor, runs: int) -> float:
    return median_seconds(lambda: mixer(h, cache=HybridCache(config)), runs)


def decode_seconds(mixer: JambaMambaMixer, config: JambaConfig, prompt: torch.Tensor, steps: int) -> float:
    cache = HybridCache(config)
    mixer(prompt, cache=cache)
    tokens = torch.randn(steps, 1, 1, prompt.shape[-1], generator=torch.Generator().manual_seed(1))
    times = []
    for token in tokens:
        start = time.perf_counter()
        mixer(token, cache=cache)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--out", default="runs/benchmarks/mamba_mixer.json")
    args = parser.parse_args()
    set_threads(args.threads)
    if not fused.fused_scan_available():
        sys.exit("the fused kernels are unavailable here (no compiler or ninja?); nothing to compare")

    model = JambaForCausalLM(JambaConfig.from_preset("jamba-small"))  # the model's own initialisation
    config = model.config
    mixer = model.model.layers[0].mamba.eval()
    g = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for n in [int(x) for x in args.lengths.split(",")]:
            h = torch.randn(1, n, config.hidden_size, generator=g)
            use_kernels(True)
            out_fused = mixer(h, cache=HybridCache(config))
            t_fused = prefill_seconds(mixer, config, h, args.runs)
            use_kernels(False)
            torch.testing.assert_close(mixer(h, cache=HybridCache(config)), out_fused, rtol=1e-4, atol=1e-5)
            t_ops = prefill_seconds(mixer, config, h, args.runs)
            rows.append(
                {
                    "measure": f"prefill {n} tokens (ms)",
                    "fused": t_fused * 1e3,
                    "PyTorch ops": t_ops * 1e3,
                    "ratio": t_ops / t_fused,
                }
            )

        prompt = torch.randn(1, 512, config.hidden_size, generator=g)
        token = torch.randn(1, 1, config.hidden_size, generator=g)
        results = {}
        for on in (True, False):
            use_kernels(on)
            cache = HybridCache(config)
            mixer(prompt, cache=cache)
            results[on] = mixer(token, cache=cache)
        torch.testing.assert_close(results[False], results[True], rtol=1e-4, atol=1e-5)
        times = {}
        for on in (True, False):
            use_kernels(on)
            times[on] = decode_seconds(mixer, config, prompt, args.steps)
        rows.append(
            {
                "measure": "decode one token after 512 (us)",
                "fused": times[True] * 1e6,
                "PyTorch ops": times[False] * 1e6,
                "ratio": times[False] / times[True],
            }
        )
    use_kernels(True)
    print(
        f"jamba-small Mamba mixer (d_inner {config.mamba_d_inner}), fp32, batch 1, threads={args.threads}, "
        f"median of {args.runs} (prefill) / {args.steps} (decode)"
    )
    print(markdown_table(rows, ["measure", "fused", "PyTorch ops", "ratio"]))
    write_results(args.out, "mamba_mixer", rows, threads=args.threads, runs=args.runs, steps=args.steps)


if __name__ == "__main__":
    main()
