"""The paper's Table 1 at small scale: accuracy and counted FLOPs from 1x to 18x the base resolution.

Scale (docs/vitar.md): base 32 px, patch 4 -> 8 x 8 tokens, G = 8 (the analogue of 224 / 16 / 14).
Data: `quintet.data.procedural_images`, rendered natively at each resolution, where the texture half of
each label is invisible at 32 px and shows from 64 px on.

Models, each trained from scratch per seed:
    vitar             ATM + FPE, trained at 32, 64, 96, 128, 160 (1x-5x, as the paper's 224-1120)
    vitar-avgpool     ablation: one adaptive average pooling to G x G instead of ATM
    vitar-interp-pe   ablation: the FPE map read at exact positions (bilinear interpolation, no offsets)
    vit               plain ViT trained at 32 only; positional table resampled (bicubic) at test, and
                      skipped above a token budget (the paper's OOM entries)
The three ViTAR variants are trained in lockstep on the very same batches.

Two phases, so the training can run where compute is (e.g. `--device cuda`) and the report anywhere:

    python benchmarks/vitar_resolution.py train --seeds 0,1,2 --results-dir runs/vitar_resolution
    python benchmarks/vitar_resolution.py report --results-dir runs/vitar_resolution \
        --json docs/vitar_resolution.json --plot docs/vitar_resolution.png

`report` counts FLOPs on the CPU with fresh models of the same configs (FLOPs do not depend on weights),
prints the table (mean +- std over seeds) and checks the issue's targets.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from quintet.data.procedural_images import ProceduralImages
from quintet.eval.vision import evaluate
from quintet.io import atomic_path, atomic_write_text
from quintet.models.vitar import build_model, count_flops, preset_config
from quintet.train.vision import VisionTrainConfig, VisionTrainer

log = logging.getLogger("vitar_resolution")

BASE = 32
VARIANTS = {
    "vitar": ("vitar-tiny", {}),
    "vitar-avgpool": ("vitar-tiny", {"merger": "avgpool"}),
    "vitar-interp-pe": ("vitar-tiny", {"pos_embed": "interpolated"}),
    "vit": ("vit-tiny", {}),
}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def train_seed(args: argparse.Namespace, seed: int) -> dict:
    """Train the four models for one seed and evaluate them; returns the per-seed record."""
    common = dict(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr=args.lr / 100,
        warmup_steps=args.warmup_steps,
        seed=seed,
        data_seed=seed,
        device=args.device,
        progress=False,
        checkpoint_every=args.steps,
        log_every=max(1, args.steps // 10),
    )
    out = Path(args.results_dir) / f"seed{seed}"
    trainers = {}
    for name in args.models:
        preset, overrides = VARIANTS[name]
        resolutions = [BASE] if name == "vit" else args.train_resolutions
        config = VisionTrainConfig(
            model=preset,
            model_overrides=overrides,
            resolutions=resolutions,
            out_dir=str(out / name),
            **common,
        )
        trainers[name] = VisionTrainer(config)
    vitars = [t for n, t in trainers.items() if n != "vit"] or list(trainers.values())
    losses: dict[str, list[float]] = {n: [] for n in trainers}
    start = time.perf_counter()
    for step in range(args.steps):
        _, images, labels = vitars[0].batch(step)
        for name, trainer in trainers.items():
            if name == "vit":
                _, vit_images, vit_labels = trainer.batch(step)
                losses[name].append(trainer.train_step(vit_images, vit_labels))
            else:
                losses[name].append(trainer.train_step(images, labels))
        if (step + 1) % max(1, args.steps // 20) == 0:
            window = max(1, args.steps // 20)
            summary = ", ".join(f"{n} {sum(v[-window:]) / window:.3f}" for n, v in losses.items())
            log.info(
                "seed %d step %d/%d (%.0fs): loss %s",
                seed,
                step + 1,
                args.steps,
                time.perf_counter() - start,
                summary,
            )
    train_seconds = time.perf_counter() - start
    for trainer in trainers.values():
        trainer.save_checkpoint()

    test = ProceduralImages(num_images=args.test_images, seed=args.test_seed, device=args.device)
    start = time.perf_counter()
    results = evaluate(
        {n: t.model for n, t in trainers.items()},
        test,
        args.test_resolutions,
        max_tokens=args.eval_max_tokens,
        skip_above_tokens=args.vit_token_budget,
        progress=False,
    )
    eval_seconds = time.perf_counter() - start
    tail = max(1, args.steps // 20)
    record = {
        "seed": seed,
        "device": args.device,
        "torch": torch.__version__,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "final_train_loss": {n: sum(v[-tail:]) / tail for n, v in losses.items()},
        "accuracy": {n: {r.resolution: r.accuracy for r in rs} for n, rs in results.items()},
        "skipped": {n: {r.resolution: r.skipped for r in rs if r.skipped} for n, rs in results.items()},
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
    }
    atomic_write_text(out / "result.json", json.dumps(record, indent=2) + "\n")
    log.info("seed %d: trained in %.0fs, evaluated in %.0fs", seed, train_seconds, eval_seconds)
    return record


def cmd_train(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    log.info("torch %s, %d threads, device %s", torch.__version__, torch.get_num_threads(), args.device)
    for seed in args.seeds:
        if (Path(args.results_dir) / f"seed{seed}" / "result.json").is_file() and not args.overwrite:
            log.info("seed %d: result.json exists, skipped (use --overwrite)", seed)
            continue
        train_seed(args, seed)
    return 0


def count_model_flops(
    names: list[str], resolutions: list[int], token_budget: int
) -> dict[str, dict[int, int | None]]:
    """Counted FLOPs of one image per model and resolution (CPU, fresh weights); None over the budget."""
    flops: dict[str, dict[int, int | None]] = {}
    for name in names:
        preset, overrides = VARIANTS[name]
        model = build_model(preset_config(preset, **overrides)).eval()
        flops[name] = {}
        for r in resolutions:
            over = name == "vit" and model.num_tokens(r, r) > token_budget
            flops[name][r] = None if over else count_flops(model, torch.rand(1, 3, r, r))
    return flops


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results_dir: str) -> tuple[dict, list[str], dict]:
    """Mean +- std over the seeds of one run, counted FLOPs, the issue's checks; (report, lines, table)."""
    records = [json.loads(p.read_text()) for p in sorted(Path(results_dir).glob("seed*/result.json"))]
    if not records:
        raise SystemExit(f"{results_dir}: no seed*/result.json; run the train phase first")
    settings = records[0]["settings"]
    resolutions = [int(r) for r in settings["test_resolutions"]]
    budget = settings["vit_token_budget"]
    names = [n for n in VARIANTS if n in records[0]["accuracy"]]
    if "vitar" not in names:
        raise SystemExit(f"{results_dir}: the results have no 'vitar' model")
    flops = count_model_flops([n for n in VARIANTS if n in names or n == "vit"], resolutions, budget)
    table: dict[str, dict[int, dict]] = {}
    for name in names:
        table[name] = {}
        for r in resolutions:
            accs = [rec["accuracy"][name][str(r)] for rec in records]
            mean, std = (None, None) if any(a is None for a in accs) else _mean_std([100 * a for a in accs])
            table[name][r] = {"accuracy_mean": mean, "accuracy_std": std, "flops": flops[name][r]}

    lines = [
        f"run {results_dir}: seeds {[rec['seed'] for rec in records]}; {settings['test_images']} test images "
        f"per resolution; trained {settings['steps']} steps x {settings['batch_size']} images on "
        f"{records[0]['device']} (torch {records[0]['torch']})",
        "",
        "| res (x base) | " + " | ".join(f"{n} acc %" for n in names) + " | vitar GFLOPs | vit GFLOPs |",
        "| --- | " + " | ".join("---" for _ in names) + " | --- | --- |",
    ]
    for r in resolutions:
        cells = [
            "skipped"
            if table[n][r]["accuracy_mean"] is None
            else f"{table[n][r]['accuracy_mean']:.1f} +- {table[n][r]['accuracy_std']:.1f}"
            for n in names
        ]
        vf, tf = flops["vitar"][r], flops["vit"][r]
        vit_flops = "skipped" if tf is None else f"{tf / 1e9:.3f}"
        lines.append(f"| {r} ({r / BASE:g}x) | " + " | ".join(cells) + f" | {vf / 1e9:.3f} | {vit_flops} |")

    # The targets. At 1x the texture half of the label is invisible by construction (at most 50 %),
    # so the accuracy-holding target is also checked from 2x, where all the information is present.
    vitar = {r: v["accuracy_mean"] for r, v in table["vitar"].items()}
    best_r = max(resolutions, key=lambda r: vitar[r])
    checks: dict[str, dict] = {"best_accuracy": {"resolution": best_r, "accuracy": vitar[best_r]}}
    for key, low in (("up_to_10x", BASE), ("from_2x_to_10x", 2 * BASE)):
        span = [r for r in resolutions if low <= r <= 10 * BASE]
        worst_r = min(span, key=lambda r: vitar[r])
        drop = vitar[best_r] - vitar[worst_r]
        checks[f"worst_{key}"] = {
            "resolution": worst_r,
            "accuracy": vitar[worst_r],
            "drop": drop,
            "target_drop_at_most": 3.0,
            "met": drop <= 3.0,
        }
        lines.append(
            f"ViTAR {key.replace('_', ' ')}: worst {vitar[worst_r]:.1f}% at {worst_r}px, {drop:.1f} points "
            f"below its best ({vitar[best_r]:.1f}% at {best_r}px); target <= 3: "
            f"{'met' if drop <= 3 else 'NOT met'}"
        )
    r8 = 8 * BASE
    ratio = flops["vit"][r8] / flops["vitar"][r8] if flops["vit"].get(r8) else None
    checks["flops_ratio_vit_over_vitar_at_8x"] = {
        "ratio": ratio,
        "target_at_least": 10.0,
        "met": ratio is not None and ratio >= 10.0,
    }
    if ratio is not None:
        lines.append(
            f"FLOPs at 8x ({r8}px): ViT / ViTAR = {ratio:.1f}x; target >= 10x: "
            f"{'met' if ratio >= 10 else 'NOT met'}"
        )
    lines.append(
        "final training loss (mean over seeds): "
        + ", ".join(
            f"{n} {statistics.fmean(rec['final_train_loss'][n] for rec in records):.3f}" for n in names
        )
    )
    report = {
        "results_dir": results_dir,
        "settings": settings,
        "seeds": [rec["seed"] for rec in records],
        "device": records[0]["device"],
        "torch": records[0]["torch"],
        "train_seconds": [rec["train_seconds"] for rec in records],
        "final_train_loss": [rec["final_train_loss"] for rec in records],
        "table": {n: {str(r): v for r, v in rows.items()} for n, rows in table.items()},
        "per_seed_accuracy": {rec["seed"]: rec["accuracy"] for rec in records},
        "checks": checks,
    }
    return report, lines, table


def cmd_report(args: argparse.Namespace) -> int:
    runs = [summarise(d) for d in args.results_dir]
    text = "\n\n".join("\n".join(lines) for _, lines, _ in runs)
    print(text)
    if args.json:
        atomic_write_text(args.json, json.dumps({"runs": [r for r, _, _ in runs]}, indent=2) + "\n")
    if args.markdown:
        atomic_write_text(args.markdown, text + "\n")
    if args.plot:
        plot(runs, Path(args.plot))
    return 0


def plot(runs: list[tuple[dict, list[str], dict]], path: Path) -> None:
    """One accuracy panel per run, then counted FLOPs (from the first run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs) + 1, figsize=(6 * (len(runs) + 1), 5.6))
    styles = {"vitar": "o-", "vitar-avgpool": "s--", "vitar-interp-pe": "^--", "vit": "x-"}
    for ax, (report, _, table) in zip(axes, runs, strict=False):
        settings = report["settings"]
        for name, rows in table.items():
            rs = [r for r in sorted(rows) if rows[r]["accuracy_mean"] is not None]
            ax.errorbar(
                [r / BASE for r in rs],
                [rows[r]["accuracy_mean"] for r in rs],
                yerr=[rows[r]["accuracy_std"] for r in rs],
                fmt=styles[name],
                label=name,
                capsize=3,
            )
        lo, hi = min(settings["train_resolutions"]) / BASE, max(settings["train_resolutions"]) / BASE
        ax.axvspan(lo, hi, color="0.92", label="ViTAR training range")
        ax.axhline(50, color="0.6", lw=0.8, ls=":", label="best possible at 1x (texture invisible)")
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 100)
        ax.set_xlabel(f"test resolution / base ({BASE} px)")
        ax.set_ylabel(f"top-1 accuracy % (mean +- std, {len(report['seeds'])} seeds)")
        ax.set_title(f"{settings['steps']} steps x {settings['batch_size']} images")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
        ax.grid(alpha=0.3)
    bx = axes[-1]
    first = runs[0][2]
    flops = count_model_flops(
        list(VARIANTS), sorted(first["vitar"]), runs[0][0]["settings"]["vit_token_budget"]
    )
    for name in ("vitar", "vitar-avgpool", "vit"):
        rs = [r for r in sorted(flops[name]) if flops[name][r] is not None]
        bx.plot([r / BASE for r in rs], [flops[name][r] / 1e9 for r in rs], styles[name], label=name)
    bx.set_xscale("log", base=2)
    bx.set_yscale("log")
    bx.set_xlabel(f"test resolution / base ({BASE} px)")
    bx.set_ylabel("counted GFLOPs per image")
    bx.set_title("Counted FLOPs (ViT skipped above its token budget)")
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3, which="both")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="phase", required=True)
    train = sub.add_parser("train", help="train and evaluate the four models per seed")
    train.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    train.add_argument(
        "--models",
        type=lambda t: t.split(","),
        default=list(VARIANTS),
        help=f"subset of {','.join(VARIANTS)}",
    )
    train.add_argument("--steps", type=int, default=3000)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--warmup-steps", type=int, default=200)
    train.add_argument("--train-resolutions", type=_ints, default=[32, 64, 96, 128, 160])
    train.add_argument(
        "--test-resolutions",
        type=_ints,
        default=[32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 576],
    )
    train.add_argument("--test-images", type=int, default=1000)
    train.add_argument("--test-seed", type=int, default=999_999)
    train.add_argument(
        "--vit-token-budget",
        type=int,
        default=1 + 64 * 64,
        help="skip the ViT above this many encoder tokens (default: runs at 8x, skipped at 10x, "
        "as DeiT-B ran at 1792 and was OOM at 2240 in the paper)",
    )
    train.add_argument("--eval-max-tokens", type=int, default=1 << 18)
    train.add_argument("--device", default="cpu")
    train.add_argument("--threads", type=int, default=2)
    train.add_argument("--results-dir", default="runs/vitar_resolution")
    train.add_argument("--overwrite", action="store_true")
    train.set_defaults(func=cmd_train)
    report = sub.add_parser("report", help="aggregate seeds, count FLOPs, print the table, write JSON + PNG")
    report.add_argument(
        "--results-dir",
        nargs="+",
        default=["runs/vitar_resolution"],
        help="one or more train-phase folders; each is one run (a table and a plot panel)",
    )
    report.add_argument("--json", help="write the report as JSON here")
    report.add_argument("--markdown", help="write the table as Markdown here")
    report.add_argument("--plot", help="write the PNG plot here")
    report.set_defaults(func=cmd_report)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
