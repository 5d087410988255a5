"""The fused CPU selective scan against transformers' pure-PyTorch scan (and quintet's own PyTorch scan).

    python benchmarks/scan.py [--quick] [--threads 1] [--runs 5] [--out runs/benchmarks/scan.json]

Four tables, each a median of --runs calls after one warm-up call, on the same fp32 inputs laid out as the
Jamba mixer makes them (d_state 16, softplus(dt + bias), D skip, silu(z) gate, B and C as (b, L, n) views):

1. forward: `selective_scan_fused` vs `transformers.models.jamba.modeling_jamba.mamba_selective_scan`,
   called as JambaMambaMixer calls it (the sequential path) and vs `quintet...selective_scan`;
2. forward + backward (all input gradients). transformers' backward is quadratic in the length (each step's
   slice of its (b, d, L, n) tensors back-propagates into a full-size zero tensor), so it only runs on the
   small shapes where it finishes in seconds, not minutes;
3. linearity: our time per token as the length grows (and the fitted exponent of time ~ L^k);
4. the one-token decode step: `selective_state_update_fused` vs the PyTorch `selective_state_update`.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import markdown_table, median_seconds, set_threads, write_results  # noqa: E402

from quintet.kernels.selective_scan import selective_scan, selective_state_update  # noqa: E402
from quintet.kernels.selective_scan_cpu import (  # noqa: E402
    fused_scan_available,
    selective_scan_fused,
    selective_state_update_fused,
)

D_STATE = 16
FULL = dict(
    forward=[
        (1, 1024, 512),
        (1, 2048, 1024),
        (2, 2048, 2048),
        (4, 1024, 4096),
        (1, 4096, 4096),
    ],
    backward_ref=[(1, 1024, 256), (1, 1024, 512)],
    linearity=(1, 2048, [512, 1024, 2048, 4096]),
    decode=[(1, 1024), (1, 2048), (1, 4096), (4, 1024), (4, 4096)],
)
QUICK = dict(
    forward=[(1, 1024, 512), (2, 1024, 1024)],
    backward_ref=[(1, 512, 128), (1, 512, 256)],
    linearity=(1, 1024, [256, 512, 1024, 2048]),
    decode=[(1, 1024), (4, 4096)],
)

Inputs = dict[str, torch.Tensor]


def mixer_inputs(b: int, d: int, L: int, seed: int = 0) -> Inputs:
    """Inputs with the mixer's value ranges: dt in about [0.001, 0.1] after softplus, A = -(1..n)."""
    g = torch.Generator().manual_seed(seed)
    dt_init = torch.exp(torch.rand(d, generator=g) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    return dict(
        u=torch.nn.functional.silu(torch.randn(b, d, L, generator=g)),
        delta=torch.randn(b, d, L, generator=g) * 0.1,
        A=-torch.arange(1, D_STATE + 1, dtype=torch.float32).expand(d, -1).contiguous(),
        B=torch.randn(b, L, D_STATE, generator=g).transpose(1, 2),
        C=torch.randn(b, L, D_STATE, generator=g).transpose(1, 2),
        D=torch.ones(d),
        z=torch.randn(b, d, L, generator=g),
        delta_bias=dt_init + torch.log(-torch.expm1(-dt_init)),  # inverse softplus, as Mamba initialises it
    )


def ours(x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    return selective_scan_fused(**x, delta_softplus=True)


def quintet_torch(x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    return selective_scan(**x, delta_softplus=True)


def hf(x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers.models.jamba.modeling_jamba import mamba_selective_scan

    return mamba_selective_scan(
        x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"], delta_bias=x["delta_bias"],
        delta_softplus=True, return_last_state=True, use_mambapy=False, use_associative_scan=False,
    )  # fmt: skip


def timed(fn: Callable[[], object], runs: int, budget_s: float = 1.0) -> tuple[float, float]:
    """(median, fastest) wall time of at least `runs` calls after one warm-up call. Fast calls are repeated
    until about `budget_s` is spent (up to 100 calls), so a busy shared machine disturbs the median less."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(max(runs, min(100, int(budget_s / max(first, 1e-9))))):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def forward_only(fn: Callable[[Inputs], object], x: Inputs) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return fn(x)

    return run


def forward_backward(fn: Callable[[Inputs], tuple[torch.Tensor, ...]], x: Inputs) -> Callable[[], None]:
    leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items()}

    def run() -> None:
        for v in leaves.values():
            v.grad = None
        y, h = fn(leaves)
        (y.sum() + h.sum()).backward()

    return run


def check_same(x: Inputs) -> None:
    """Ours and transformers agree on the output and the final state before either is timed."""
    with torch.no_grad():
        (y, h), (y_ref, h_ref) = ours(x), hf(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4)


def bench_forward(shapes: list[tuple[int, int, int]], runs: int, bar: tqdm) -> list[dict[str, object]]:
    rows = []
    for b, d, L in shapes:
        bar.set_description(f"forward {b}x{d}x{L}")
        x = mixer_inputs(b, d, L)
        check_same(x)
        (t_ours, min_ours), (t_torch, _), (t_hf, _) = (
            timed(forward_only(fn, x), runs) for fn in (ours, quintet_torch, hf)
        )
        rows.append(
            {"section": "forward", "batch": b, "d_inner": d, "length": L, "fused ms": 1e3 * t_ours,
             "quintet torch ms": 1e3 * t_torch, "transformers ms": 1e3 * t_hf,
             "x vs transformers": t_hf / t_ours, "x vs quintet torch": t_torch / t_ours,
             "fused fastest ms": 1e3 * min_ours}
        )  # fmt: skip
        bar.update()
    return rows


def bench_backward(
    shapes: list[tuple[int, int, int]], ref_shapes: list[tuple[int, int, int]], runs: int, bar: tqdm
) -> list[dict[str, object]]:
    rows = []
    for b, d, L in ref_shapes + [s for s in shapes if s not in ref_shapes]:
        bar.set_description(f"forward+backward {b}x{d}x{L}")
        x = mixer_inputs(b, d, L)
        t_ours, min_ours = timed(forward_backward(ours, x), runs)
        row: dict[str, object] = {"section": "forward+backward", "batch": b, "d_inner": d, "length": L}
        row.update({"fused ms": 1e3 * t_ours, "fused fastest ms": 1e3 * min_ours})
        if (b, d, L) in ref_shapes:  # the references are quadratic in L: no warm-up call, nothing to warm
            t_torch = median_seconds(forward_backward(quintet_torch, x), runs, warmup=0)
            t_hf = median_seconds(forward_backward(hf, x), runs, warmup=0)
            row.update({"quintet torch ms": 1e3 * t_torch, "transformers ms": 1e3 * t_hf})
            row.update({"x vs transformers": t_hf / t_ours, "x vs quintet torch": t_torch / t_ours})
        else:
            row.update({k: "not run" for k in ("quintet torch ms", "transformers ms")})
            row.update({k: "-" for k in ("x vs transformers", "x vs quintet torch")})
        rows.append(row)
        bar.update()
    return rows


def bench_linearity(b: int, d: int, lengths: list[int], runs: int, bar: tqdm) -> list[dict[str, object]]:
    rows = []
    for L in lengths:
        bar.set_description(f"linearity {b}x{d}x{L}")
        x = mixer_inputs(b, d, L)
        (t_fwd, min_fwd), (t_both, min_both) = (
            timed(forward_only(ours, x), runs),
            timed(forward_backward(ours, x), runs),
        )
        rows.append(
            {"section": "linearity", "batch": b, "d_inner": d, "length": L, "forward ms": 1e3 * t_fwd,
             "forward fastest ms": 1e3 * min_fwd, "forward us/token": 1e6 * min_fwd / (b * L),
             "forward+backward ms": 1e3 * t_both, "forward+backward fastest ms": 1e3 * min_both,
             "forward+backward us/token": 1e6 * min_both / (b * L)}
        )  # fmt: skip
        bar.update()
    return rows


def length_exponent(rows: list[dict[str, object]], key: str) -> float:
    """Least-squares slope of log(time) against log(length)."""
    xs = [math.log(float(r["length"])) for r in rows]
    ys = [math.log(float(r[key])) for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (c - my) for a, c in zip(xs, ys, strict=True)) / sum((a - mx) ** 2 for a in xs)


def median_call(fn: Callable[[], object], calls: int = 200) -> float:
    """Median of single calls: a decode step is too short for --runs to be a stable median."""
    return median_seconds(fn, calls, warmup=20)


def bench_decode(shapes: list[tuple[int, int]], bar: tqdm) -> list[dict[str, object]]:
    rows = []
    for b, d in shapes:
        bar.set_description(f"decode {b}x{d}")
        x = mixer_inputs(b, d, 1)
        g = torch.Generator().manual_seed(1)
        state = torch.randn(b, d, D_STATE, generator=g)
        args = (state, x["u"][..., 0], x["delta"][..., 0], x["A"], x["B"][..., 0], x["C"][..., 0], x["D"],
                x["z"][..., 0], x["delta_bias"], True)  # fmt: skip
        with torch.no_grad():
            y, s = selective_state_update_fused(*args)
            y_ref, s_ref = selective_state_update(*args)
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
            t_ours = median_call(lambda a=args: selective_state_update_fused(*a))
            t_torch = median_call(lambda a=args: selective_state_update(*a))
        rows.append(
            {"section": "decode", "batch": b, "d_inner": d, "fused us": 1e6 * t_ours,
             "quintet torch us": 1e6 * t_torch, "x vs quintet torch": t_torch / t_ours}
        )  # fmt: skip
        bar.update()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a small grid (about a minute)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5, help="timed calls per point (median); at least 5")
    parser.add_argument("--out", default="runs/benchmarks/scan.json")
    args = parser.parse_args()
    if args.runs < 5:
        parser.error("--runs must be at least 5")
    set_threads(args.threads)
    transformers.logging.set_verbosity_error()  # its "mamba_ssm is not installed" notice
    start = time.perf_counter()
    if not fused_scan_available():
        sys.exit("the fused scan is not available on this machine (see the warning above)")
    compile_s = time.perf_counter() - start
    grid = QUICK if args.quick else FULL
    b_lin, d_lin, lengths = grid["linearity"]
    backward_shapes = set(grid["forward"]) | set(grid["backward_ref"])
    total = len(grid["forward"]) + len(backward_shapes) + len(lengths) + len(grid["decode"])
    with tqdm(total=total, file=sys.stderr) as bar:
        fwd = bench_forward(grid["forward"], args.runs, bar)
        bwd = bench_backward(grid["forward"], grid["backward_ref"], args.runs, bar)
        lin = bench_linearity(b_lin, d_lin, lengths, args.runs, bar)
        dec = bench_decode(grid["decode"], bar)
    k_fwd = length_exponent(lin, "forward fastest ms")
    k_both = length_exponent(lin, "forward+backward fastest ms")

    print(f"threads={torch.get_num_threads()}, fp32, d_state {D_STATE}, median of {args.runs} runs; "
          f"kernel load {compile_s:.1f} s; total {time.perf_counter() - start:.0f} s")  # fmt: skip
    shape = ["batch", "d_inner", "length"]
    refs = ["fused ms", "quintet torch ms", "transformers ms", "x vs transformers", "x vs quintet torch"]
    print("\n### Forward\n")
    print(markdown_table(fwd, shape + refs))
    print("\n### Forward + backward\n")
    print(markdown_table(bwd, shape + refs))
    print(f"\n### Linearity in length (batch {b_lin}, d_inner {d_lin}): time ~ L^{k_fwd:.2f} forward, "
          f"L^{k_both:.2f} forward+backward\n")  # fmt: skip
    print("(exponent and us/token from the fastest run of each point: the least disturbed by other load)\n")
    print(markdown_table(lin, shape + ["forward ms", "forward us/token", "forward+backward ms",
                                       "forward+backward us/token"]))  # fmt: skip
    print("\n### Decode step (one token, median of 200 calls)\n")
    print(markdown_table(dec, ["batch", "d_inner", "fused us", "quintet torch us", "x vs quintet torch"]))
    write_results(
        args.out, "scan", fwd + bwd + lin + dec, threads=torch.get_num_threads(), runs=args.runs,
        quick=args.quick, d_state=D_STATE, kernel_load_s=compile_s,
        length_exponent={"forward": k_fwd, "forward+backward": k_both},
    )  # fmt: skip
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
