"""`make demo`, ViTAR part: train a tiny ViTAR briefly on procedural images, classify at several sizes.

Everything is generated here: no download. `quick` (the default): 400 steps of 32 images at 32-64 px,
a few minutes on two CPU cores; enough to start learning the shapes, far from converged, and the printed
accuracy is what it is. `quick=False`: 1500 steps of 64 images at 32-96 px (7.5x the images; the
trained results in docs/vitar.md took 4800 steps of 256 images, hours on a CPU).
"""

from __future__ import annotations

import time
from pathlib import Path

from quintet.data.procedural_images import ProceduralImages, write_image_folder
from quintet.eval.vision import evaluate, predict_files
from quintet.models.vitar.checkpoint import load_model
from quintet.train.vision import VisionTrainConfig, train_vision


def run_vitar_demo(out_dir: Path, quick: bool = True) -> None:
    """Train vitar-tiny on procedural shapes at 32-64 px, evaluate at 32-256 px, classify image files."""
    out_dir = Path(out_dir)
    start = time.perf_counter()
    config = VisionTrainConfig(
        model="vitar-tiny",
        resolutions=[32, 48, 64] if quick else [32, 48, 64, 96],
        steps=400 if quick else 1500,
        batch_size=32 if quick else 64,
        lr=1e-3,
        warmup_steps=25 if quick else 100,
        label_smoothing=0.0,
        out_dir=str(out_dir / "vitar-train"),
        checkpoint_every=400 if quick else 500,
        log_every=50,
        progress=False,
    )
    print(
        f"[vitar] training {config.model} for {config.steps} steps at {config.resolutions} px "
        f"(one resolution per batch) ..."
    )
    result = train_vision(config)
    print(
        f"[vitar] trained in {time.perf_counter() - start:.0f}s, final loss {result.final_loss:.3f}; "
        f"model: {result.model_dir}"
    )

    model = load_model(result.model_dir)
    test = ProceduralImages(num_images=100 if quick else 500, seed=424_242)
    print(
        "[vitar] held-out accuracy. Chance is 10%; 50% is the best possible at 32 px, where the texture half "
        "of the label is invisible. A run this short often has not left the initial plateau yet (see "
        "docs/vitar.md for trained results: configs/vitar-tiny.toml):"
    )
    for r in evaluate(model, test, [32, 64, 128, 256], progress=False):
        print(
            f"  {r.resolution:>4}px  {100 * r.accuracy:5.1f}%  {r.flops / 1e6:7.1f} MFLOPs  "
            f"{r.encoder_tokens} encoder tokens"
        )

    folder = out_dir / "vitar-images"
    paths = []
    for index, size in zip(range(3), [(40, 40), (96, 160), (300, 200)], strict=True):
        paths += write_image_folder(test, folder, [index], size)
    print(f"[vitar] classifying image files of different sizes (written under {folder}):")
    for p in predict_files(result.model_dir, paths, top_k=2):
        truth = Path(p.path).parent.name
        ranked = ", ".join(f"{label} {100 * prob:.0f}%" for label, prob in p.top)
        print(f"  {p.width}x{p.height}  true {truth:<20} predicted {ranked}")
