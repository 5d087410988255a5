"""Inference throughput (images/s) of ViTAR vs the plain ViT at 1x, 4x and 8x the base resolution, on CPU.

Randomly initialised models (speed does not depend on the weights), eval mode, `torch.inference_mode`,
float32. Each measurement: one warm-up batch, then `--repeats` timing windows of at least `--min-seconds`
and one batch each; the best window is reported (our machines are shared: the least disturbed window is
the closest to the machine's speed), the median beside it, and images per CPU-second of this process
(`time.process_time`; with one thread it does not count the time the process waited for a core).
A batch holds as many images as fit in `--max-tokens` patch tokens (at least one). Thread count and load
average are set/measured and reported.

    python benchmarks/vitar_throughput.py --threads 2 --json docs/vitar_throughput.json

Scales: `tiny` (vitar-tiny / vit-tiny: 32 px base, patch 4) and `s` (vitar-s / vit-s: 224 px base,
patch 16, DeiT-S widths). A ViT whose encoder would see more than `--vit-token-budget` tokens is not run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from quintet.eval.vision import images_per_batch
from quintet.io import atomic_write_text
from quintet.models.vitar import build_model, count_flops, preset_config

SCALES = {"tiny": ("vitar-tiny", "vit-tiny", 32), "s": ("vitar-s", "vit-s", 224)}


def measure(
    model: torch.nn.Module, resolution: int, max_tokens: int, min_seconds: float, repeats: int
) -> dict:
    """Images/s over `repeats` windows of at least `min_seconds` (and one batch) each, after a warm-up batch.

    The best window is the headline number (on a shared machine, the least disturbed one); the median is
    kept beside it.
    """
    batch = images_per_batch(model, resolution, max_tokens)
    images = torch.rand(batch, 3, resolution, resolution)
    rates, cpu_rates = [], []
    with torch.inference_mode():
        model(images)
        for _ in range(repeats):
            done, start, cpu_start = 0, time.perf_counter(), time.process_time()
            while True:
                model(images)
                done += batch
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds:
                    break
            rates.append(done / elapsed)
            cpu_rates.append(done / max(time.process_time() - cpu_start, 1e-9))
    return {
        "batch": batch,
        "images_per_s": max(rates),
        "median_images_per_s": statistics.median(rates),
        "images_per_cpu_s": statistics.median(cpu_rates),
        "windows": rates,
    }


def _table_row(row: dict) -> str:
    v, t = row["vitar"], row["vit"]
    cells = [
        row["scale"],
        f"{row['resolution']} ({row['multiple']}x)",
        f"{v['images_per_s']:.1f} ({v['median_images_per_s']:.1f})",
    ]
    if "skipped" in t:
        cells += ["skipped", "-", f"{v['images_per_cpu_s']:.1f}", "skipped", "-", f"{v['gflops']:.3f}", "-"]
    else:
        cells += [
            f"{t['images_per_s']:.1f} ({t['median_images_per_s']:.1f})",
            f"{v['images_per_s'] / t['images_per_s']:.1f}x",
            f"{v['images_per_cpu_s']:.1f}",
            f"{t['images_per_cpu_s']:.1f}",
            f"{v['images_per_cpu_s'] / t['images_per_cpu_s']:.1f}x",
            f"{v['gflops']:.3f}",
            f"{t['gflops']:.3f}",
        ]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scales", default="tiny,s")
    parser.add_argument("--multiples", default="1,4,8", help="resolutions as multiples of the base")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=1 << 15)
    parser.add_argument("--min-seconds", type=float, default=1.0, help="length of one timing window")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timing windows per measurement (best reported)"
    )
    parser.add_argument(
        "--vit-token-budget",
        type=int,
        default=1 + 64 * 64,
        help="skip the ViT above this many encoder tokens (default: all of vit-tiny and 1x, 4x of vit-s run)",
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU; "
        f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(
        "| scale | res (x base) | ViTAR img/s best (median) | ViT img/s best (median) | ViTAR / ViT "
        "| ViTAR img per CPU-s | ViT img per CPU-s | ViTAR / ViT (CPU-s) | ViTAR GFLOPs | ViT GFLOPs |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for scale in args.scales.split(","):
        vitar_name, vit_name, base = SCALES[scale]
        vitar = build_model(preset_config(vitar_name)).eval()
        vit = build_model(preset_config(vit_name)).eval()
        for multiple in (int(m) for m in args.multiples.split(",")):
            r = base * multiple
            row = {"scale": scale, "resolution": r, "multiple": multiple}
            row["vitar"] = measure(vitar, r, args.max_tokens, args.min_seconds, args.repeats)
            row["vitar"]["gflops"] = count_flops(vitar, torch.rand(1, 3, r, r)) / 1e9
            if vit.num_tokens(r, r) <= args.vit_token_budget:
                row["vit"] = measure(vit, r, args.max_tokens, args.min_seconds, args.repeats)
                row["vit"]["gflops"] = count_flops(vit, torch.rand(1, 3, r, r)) / 1e9
            else:
                row["vit"] = {"skipped": f"{vit.num_tokens(r, r)} encoder tokens > {args.vit_token_budget}"}
            rows.append(row)
            print(_table_row(row), flush=True)
    if args.json:
        report = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "settings": vars(args),
            "load_average_before": load,
            "load_average_after": os.getloadavg(),
            "rows": rows,
        }
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
