"""Accuracy and counted FLOPs per resolution; top-k prediction for images of any size.

Evaluation batches are capped by token count (`max_tokens` patch tokens per forward), so a 576 px batch
holds fewer images than a 32 px one. Models run in eval mode under `torch.inference_mode`: no fuzzy
offsets, no stochastic depth, so results are deterministic.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from quintet.models.vitar.flops import count_flops
from quintet.models.vitar.model import ImageClassifier

log = logging.getLogger(__name__)


@dataclass
class ResolutionResult:
    """One model at one resolution. `accuracy` and `flops` are None when skipped (over the token budget)."""

    resolution: int
    accuracy: float | None
    correct: int
    total: int
    flops: int | None
    encoder_tokens: int
    skipped: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def patch_tokens(model: ImageClassifier, height: int, width: int) -> int:
    h, w = model.patch_embed.grid(height, width)
    return h * w


def images_per_batch(model: ImageClassifier, resolution: int, max_tokens: int) -> int:
    """How many r x r images fit in one forward of at most `max_tokens` patch tokens (at least 1)."""
    return max(1, max_tokens // patch_tokens(model, resolution, resolution))


def evaluate(
    models: ImageClassifier | Mapping[str, ImageClassifier],
    dataset,  # noqa: ANN001 - any dataset with `len()` and `batch(indices, resolution)`
    resolutions: Sequence[int],
    num_images: int | None = None,
    max_tokens: int = 1 << 16,
    skip_above_tokens: int | None = None,
    progress: bool = True,
) -> dict[str, list[ResolutionResult]] | list[ResolutionResult]:
    """Top-1 accuracy and counted FLOPs per image for each resolution.

    Several models can be given as {name: model}: each evaluation batch is then loaded (or rendered) once
    and shown to all of them. A model whose encoder would see more than `skip_above_tokens` tokens at a
    resolution is skipped there (the paper's OOM entries).
    """
    single = not isinstance(models, Mapping)
    named: dict[str, ImageClassifier] = {"model": models} if single else dict(models)
    for model in named.values():
        model.eval()
    n = len(dataset) if num_images is None else min(num_images, len(dataset))
    if n < 1:
        raise ValueError("evaluate: the dataset has no images")
    results: dict[str, list[ResolutionResult]] = {name: [] for name in named}
    for r in resolutions:
        active = {}
        for name, model in named.items():
            tokens = model.num_tokens(r, r)
            if skip_above_tokens is not None and tokens > skip_above_tokens:
                reason = f"{tokens} encoder tokens > budget {skip_above_tokens}"
                results[name].append(ResolutionResult(r, None, 0, 0, None, tokens, reason))
            else:
                active[name] = model
        if not active:
            continue
        batch = min(images_per_batch(m, r, max_tokens) for m in active.values())
        correct = dict.fromkeys(active, 0)
        bar = tqdm(total=n, desc=f"eval {r}px", unit="img", disable=not progress, leave=False)
        first = None
        for start in range(0, n, batch):
            indices = list(range(start, min(n, start + batch)))
            images, labels = dataset.batch(indices, r)
            first = images[:1] if first is None else first
            with torch.inference_mode():
                for name, model in active.items():
                    device = next(model.parameters()).device
                    pred = model(images.to(device)).argmax(-1).cpu()
                    correct[name] += int((pred == labels).sum())
            bar.update(len(indices))
        bar.close()
        for name, model in active.items():
            device = next(model.parameters()).device
            flops = count_flops(model, first.to(device))
            acc = correct[name] / n
            results[name].append(ResolutionResult(r, acc, correct[name], n, flops, model.num_tokens(r, r)))
            log.info("%s @ %dpx: accuracy %.4f, %.3f GFLOPs", name, r, acc, flops / 1e9)
    return results["model"] if single else results


@dataclass
class Prediction:
    path: str
    height: int
    width: int
    top: list[tuple[str, float]]  # (label, probability), best first


def predict(
    model: ImageClassifier, images: Sequence[torch.Tensor], top_k: int = 5
) -> list[list[tuple[str, float]]]:
    """Top-k (label, probability) for each image (3, H, W) in [0, 1], each at its own size."""
    model.eval()
    device = next(model.parameters()).device
    k = min(top_k, model.config.num_classes)
    out = []
    with torch.inference_mode():
        for image in images:
            probs = model(image[None].to(device)).softmax(-1)[0].cpu()
            values, idx = probs.topk(k)
            out.append([(model.config.label(int(i)), float(v)) for v, i in zip(values, idx, strict=True)])
    return out


def predict_files(
    model_dir: str | os.PathLike,
    paths: Sequence[str | os.PathLike],
    top_k: int = 5,
    resolution: int | None = None,
) -> list[Prediction]:
    """Load a model folder (float, or FP4 from `quintet deploy quantize`) and classify image files at their
    own size (or resized to `resolution`)."""
    from quintet.data.images import load_image, resize
    from quintet.loading import load_model

    if top_k < 1:
        raise ValueError(f"--top-k {top_k}: expected a positive number of classes, e.g. 3")
    model = load_model(model_dir)
    patch = getattr(model.config, "patch_size", 1)
    if resolution is not None and resolution < patch:
        raise ValueError(
            f"--resolution {resolution}: expected a square size in pixels of at least the model's patch size "
            f"({patch}), e.g. {max(patch, 224)}; leave it out to classify each image at its own size"
        )
    results = []
    for path in paths:
        image = load_image(path)
        _, h, w = image.shape
        if resolution is not None:
            image = resize(image, resolution)
        (top,) = predict(model, [image], top_k)
        results.append(Prediction(str(Path(path)), h, w, top))
    return results
