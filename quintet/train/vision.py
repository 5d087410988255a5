"""Multi-resolution training of ViTAR (and the plain ViT baseline), supervised or masked-autoencoder.

The paper's recipe at any scale: ONE resolution per batch, drawn from a configured list; cross-entropy
only; AdamW with linear warm-up and cosine decay. `mode = "mae"` pre-trains ViTAR as a masked
autoencoder on the same multi-resolution batches (see `quintet.models.vitar.mae`); a later supervised
run starts from it with `init_from`.

Everything random is a function of the config: batch t's resolution and images come from
(data_seed, t); model-side randomness (fuzzy offsets, stochastic depth, MAE masks) comes from a torch
RNG stream that is saved with each checkpoint. So a run resumed from a checkpoint continues exactly as
the uninterrupted run would have (`tests/test_vitar_train.py` checks it bit for bit).

Output folder:

    out_dir/model/                       config.json + model.safetensors: the trained classifier
                                         (for MAE: the pre-trained backbone, head untrained)
    out_dir/checkpoint/state.safetensors model, AdamW moments and the RNG state (safetensors, no pickle)
    out_dir/checkpoint/trainer_state.json step, config, loss history
    out_dir/train_result.json            summary (and evaluation per resolution when configured)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from quintet.config import read_config
from quintet.data.procedural_images import make_dataset
from quintet.errors import CheckpointError, OutputInUseError
from quintet.io import atomic_write_text, output_lock, write_safetensors
from quintet.lr_schedule import lr_at_step
from quintet.models.vitar.checkpoint import build_model, load_model, load_state
from quintet.models.vitar.configuration import ConfigError, ViTARConfig, preset_config
from quintet.models.vitar.mae import ViTARForMaskedImageModeling
from quintet.models.vitar.model import ImageClassifier
from quintet.train.checkpoint import checkpoint_dir, latest_checkpoint, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

MODES = ("supervised", "mae")
# Fields that may change between a run and its resumption (they do not change what is computed).
_RESUMABLE_CHANGES = {
    "out_dir",
    "checkpoint_every",
    "log_every",
    "eval_resolutions",
    "eval_images",
    "eval_data",
    "eval_max_tokens",
    "num_threads",
    "device",
    "progress",
}


@dataclass
class VisionTrainConfig:
    """A training run. Read from TOML (or JSON) by `load_train_config`; every field validated."""

    model: str = "vitar-tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    mode: str = "supervised"
    data: str = "procedural"
    data_seed: int | None = None
    resolutions: list[int] = field(default_factory=lambda: [32])
    resolution_weights: list[float] | None = None
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    label_smoothing: float = 0.1
    seed: int = 0
    out_dir: str = "runs/vitar"
    checkpoint_every: int = 500
    log_every: int = 50
    eval_data: str | None = None
    eval_resolutions: list[int] = field(default_factory=list)
    eval_images: int = 500
    eval_max_tokens: int = 1 << 16
    num_threads: int | None = None
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        self.resolutions = list(self.resolutions)
        self.eval_resolutions = list(self.eval_resolutions)
        self.betas = tuple(self.betas)
        if self.data_seed is None:
            self.data_seed = self.seed
        self.validate()

    def validate(self) -> None:
        name = "VisionTrainConfig"
        if self.mode not in MODES:
            raise ConfigError(f"{name}.mode = {self.mode!r}: valid values: {', '.join(MODES)}")
        for key in ("steps", "batch_size", "checkpoint_every", "log_every", "eval_images", "eval_max_tokens"):
            _positive_int(key, getattr(self, key))
        for key in ("warmup_steps", "seed", "data_seed"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name}.{key} = {value!r}: must be an integer >= 0")
        if self.num_threads is not None:
            _positive_int("num_threads", self.num_threads)
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ConfigError(f"{name}.device = {self.device!r}: valid values: cpu, cuda, cuda:N") from None
        if not self.resolutions:
            raise ConfigError(f"{name}.resolutions = []: give at least one training resolution in pixels")
        for key in ("resolutions", "eval_resolutions"):
            for r in getattr(self, key):
                if not isinstance(r, int) or isinstance(r, bool) or r < 1:
                    raise ConfigError(
                        f"{name}.{key} contains {r!r}: resolutions are positive integers (pixels)"
                    )
        if self.resolution_weights is not None:
            w = self.resolution_weights
            if len(w) != len(self.resolutions) or any(not isinstance(v, (int, float)) or v < 0 for v in w):
                raise ConfigError(
                    f"{name}.resolution_weights = {w!r}: needs {len(self.resolutions)} non-negative numbers, "
                    "one per resolution"
                )
            if sum(w) <= 0:
                raise ConfigError(f"{name}.resolution_weights = {w!r}: must not all be zero")
        for key in ("lr", "min_lr"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{name}.{key} = {value!r}: must be a number >= 0")
        if self.min_lr > self.lr:
            raise ConfigError(f"{name}.min_lr = {self.min_lr}: must not exceed lr = {self.lr}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ConfigError(f"{name}.weight_decay = {self.weight_decay!r}: must be a number >= 0")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{name}.betas = {list(self.betas)}: needs two numbers in [0, 1)")
        if self.grad_clip is not None and (
            not isinstance(self.grad_clip, (int, float)) or self.grad_clip <= 0
        ):
            raise ConfigError(f"{name}.grad_clip = {self.grad_clip!r}: must be a number > 0, or omitted")
        if not isinstance(self.label_smoothing, (int, float)) or not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"{name}.label_smoothing = {self.label_smoothing!r}: must be in [0, 1)")
        if not isinstance(self.model_overrides, dict):
            raise ConfigError(f"{name}.model_overrides = {self.model_overrides!r}: must be a table of fields")
        model_config = preset_config(self.model, **self.model_overrides)
        if self.mode == "mae" and not isinstance(model_config, ViTARConfig):
            raise ConfigError(
                f"{name}.mode = 'mae' needs a ViTAR model; model = {self.model!r} is a plain ViT"
            )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out


def _positive_int(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"VisionTrainConfig.{key} = {value!r}: must be a positive integer")


def load_train_config(path: str | os.PathLike, **overrides: Any) -> VisionTrainConfig:
    """Read a TOML, YAML or JSON training config; unknown keys and wrong types are errors naming them."""
    config = read_config(path, "training config")
    data = {**config.data, **overrides}
    return config.section("", VisionTrainConfig, values=data, label="top level")


# ---------------------------------------------------------------- pure pieces
def learning_rate(step: int, config: VisionTrainConfig) -> float:
    """Linear warm-up to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `steps`."""
    return lr_at_step(step, config.steps, config.lr, config.min_lr, config.warmup_steps)


def batch_plan(config: VisionTrainConfig, step: int, dataset_size: int | None) -> tuple[int, list[int]]:
    """Resolution and image indices of batch `step`: a function of (data_seed, step) only.

    With `dataset_size` None (a procedural stream) every batch has fresh scenes; otherwise the indices
    walk through one random permutation per epoch.
    """
    rng = np.random.default_rng([config.data_seed, step])
    weights = config.resolution_weights
    p = None if weights is None else np.asarray(weights, dtype=np.float64) / sum(weights)
    resolution = int(config.resolutions[rng.choice(len(config.resolutions), p=p)])
    b = config.batch_size
    if dataset_size is None:
        return resolution, list(range(step * b, (step + 1) * b))
    indices = []
    for position in range(step * b, (step + 1) * b):
        epoch, offset = divmod(position, dataset_size)
        perm = np.random.default_rng([config.data_seed, 1 << 20, epoch]).permutation(dataset_size)
        indices.append(int(perm[offset]))
    return resolution, indices


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms, positional maps, CLS and mask tokens."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or any(k in name for k in ("pos_map", "pos_embed", "cls_token", "mask_token")):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------- the trainer
@dataclass
class TrainResult:
    out_dir: str
    model_dir: str
    steps: int
    final_loss: float | None
    history: list[dict[str, Any]]
    evaluation: list[dict[str, Any]] = field(default_factory=list)


class VisionTrainer:
    """One training run: model, optimizer, data plan, checkpoints. `run()` is the whole loop.

    `train_step` can also be driven from outside (the resolution benchmark trains several models on the
    same batches); each trainer keeps its own torch RNG stream, swapped in around its steps.
    """

    def __init__(self, config: VisionTrainConfig, dataset=None) -> None:  # noqa: ANN001
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.device = torch.device(config.device)
        if dataset is None:
            dataset = make_dataset(config.data, seed=config.data_seed, device=config.device)
        self.dataset = dataset
        self.stream = _is_procedural(self.dataset)
        torch.manual_seed(config.seed)
        model_config = preset_config(
            config.model,
            **{
                "num_classes": self.dataset.num_classes,
                "labels": list(self.dataset.classes),
                **config.model_overrides,
            },
        )
        self.model: ImageClassifier = build_model(model_config)
        if config.init_from:
            self._init_from(config.init_from)
        self.net: nn.Module = ViTARForMaskedImageModeling(self.model) if config.mode == "mae" else self.model
        self.net.to(self.device)
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.net, config.weight_decay), lr=config.lr, betas=config.betas
        )
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self._rng_state = torch.get_rng_state()
        self._cuda_rng_state = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    def _init_from(self, directory: str) -> None:
        source = load_model(directory)
        tensors = source.state_dict()
        head = ("head.",) if tensors["head.weight"].shape != self.model.head.weight.shape else ()
        load_state(self.model, tensors, directory, skip=head)
        log.info("initialised from %s%s", directory, " (new classification head)" if head else "")

    @contextlib.contextmanager
    def _own_rng(self) -> Iterator[None]:
        cuda = self._cuda_rng_state is not None
        outer = torch.get_rng_state()
        outer_cuda = torch.cuda.get_rng_state(self.device) if cuda else None
        torch.set_rng_state(self._rng_state)
        if cuda:
            torch.cuda.set_rng_state(self._cuda_rng_state, self.device)
        try:
            yield
        finally:
            self._rng_state = torch.get_rng_state()
            torch.set_rng_state(outer)
            if cuda:
                self._cuda_rng_state = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(outer_cuda, self.device)

    def batch(self, step: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(resolution, images, labels) of batch `step`."""
        resolution, indices = batch_plan(self.config, step, None if self.stream else len(self.dataset))
        generator = torch.Generator().manual_seed(
            int(np.random.default_rng([self.config.data_seed, step, 7]).integers(1 << 62))
        )
        images, labels = self.dataset.batch(indices, resolution, train=True, generator=generator)
        return resolution, images, labels

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One optimizer step at `self.step` on this batch; returns the loss."""
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, cfg)
        self.net.train()
        images, labels = images.to(self.device), labels.to(self.device)
        with self._own_rng():
            if cfg.mode == "mae":
                loss = self.net(images).loss
            else:
                loss = F.cross_entropy(self.net(images), labels, label_smoothing=cfg.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
            self.optimizer.step()
        self.step += 1
        return float(loss.detach())

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """A checkpoint of the run (`quintet.train.checkpoint`), and the model folder `out_dir/model`."""
        names = {id(p): n for n, p in self.net.named_parameters()}
        moments = {
            names[id(param)]: dict(self.optimizer.state[param])
            for group in self.optimizer.param_groups
            for param in group["params"]
            if self.optimizer.state.get(param)
        }
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        rng = {"torch": self._rng_state}
        if self._cuda_rng_state is not None:
            rng["cuda"] = self._cuda_rng_state
        path = save_checkpoint(
            self.out_dir,
            self.step,
            lambda folder: write_safetensors(self.net.state_dict(), folder / "model.safetensors"),
            {"state": moments, "param_groups": groups},
            {"step": self.step, "history": self.history},
            rng,
            config=self.config.to_dict(),
        )
        self.model.save_pretrained(self.out_dir / "model")
        return path

    def resume(self) -> bool:
        """Load the newest checkpoint in `out_dir` if there is one; True when resumed."""
        directory = latest_checkpoint(self.out_dir)
        if directory is None:
            return False
        saved = load_checkpoint(directory)
        changed = sorted(
            k
            for k, v in self.config.to_dict().items()
            if k not in _RESUMABLE_CHANGES and (saved.config or {}).get(k) != v
        )
        if changed:
            diffs = ", ".join(
                f"{k}: {(saved.config or {}).get(k)!r} -> {getattr(self.config, k)!r}" for k in changed
            )
            raise ConfigError(f"{directory}: cannot resume, the config changed ({diffs})")
        load_state(self.net, saved.model_state, str(directory / "model.safetensors"))
        params = dict(self.net.named_parameters())
        for name, slots in saved.optimizer["state"].items():
            if name not in params:
                raise CheckpointError(f"{directory}: optimizer state for unknown parameter {name}")
            state = self.optimizer.state[params[name]]
            for slot, value in slots.items():
                state[slot] = value if slot == "step" else value.to(params[name].device)
        self._rng_state = saved.rng["torch"]
        if self._cuda_rng_state is not None and "cuda" in saved.rng:
            self._cuda_rng_state = saved.rng["cuda"]
        self.step = saved.trainer["step"]
        self.history = saved.trainer["history"]
        log.info("resumed from %s at step %d", directory, self.step)
        return True

    # ------------------------------------------------------------ the loop
    def run(self, until: int | None = None) -> TrainResult:
        """Train to `config.steps` (or stop early after step `until`, e.g. to run in pieces)."""
        cfg = self.config
        last = cfg.steps if until is None else min(until, cfg.steps)
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            desc=f"train {cfg.model}",
            unit="step",
            disable=not cfg.progress,
        )
        window: list[float] = []
        window_start = time.perf_counter()
        images_seen = 0
        while self.step < last:
            resolution, images, labels = self.batch(self.step)
            loss = self.train_step(images, labels)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {self.step} (resolution {resolution}px)")
            window.append(loss)
            images_seen += images.shape[0]
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", res=resolution)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                elapsed = time.perf_counter() - window_start
                entry = {
                    "step": self.step,
                    "loss": sum(window) / len(window),
                    "lr": learning_rate(self.step - 1, cfg),
                    "images_per_s": images_seen / max(elapsed, 1e-9),
                }
                self.history.append(entry)
                log.info(
                    "step %d: loss %.4f, lr %.2e, %.1f img/s",
                    entry["step"],
                    entry["loss"],
                    entry["lr"],
                    entry["images_per_s"],
                )
                window, images_seen, window_start = [], 0, time.perf_counter()
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
        bar.close()
        result = TrainResult(
            out_dir=str(self.out_dir),
            model_dir=str(self.out_dir / "model"),
            steps=self.step,
            final_loss=self.history[-1]["loss"] if self.history else None,
            history=self.history,
        )
        if cfg.eval_resolutions and cfg.mode == "supervised":
            result.evaluation = [r.to_dict() for r in self.evaluate()]
        atomic_write_text(
            self.out_dir / "train_result.json", json.dumps(dataclasses.asdict(result), indent=2) + "\n"
        )
        return result

    def evaluate(self):  # noqa: ANN201
        from quintet.eval.vision import evaluate

        cfg = self.config
        spec = cfg.eval_data or cfg.data
        # held-out procedural scenes: a seed the training stream never uses
        dataset = make_dataset(
            spec, seed=cfg.data_seed + 1_000_003, num_images=cfg.eval_images, device=cfg.device
        )
        return evaluate(
            self.model,
            dataset,
            cfg.eval_resolutions,
            num_images=cfg.eval_images,
            max_tokens=cfg.eval_max_tokens,
            progress=cfg.progress,
        )


def _is_procedural(dataset) -> bool:  # noqa: ANN001
    from quintet.data.procedural_images import ProceduralImages

    return isinstance(dataset, ProceduralImages)


def train_vision(config: VisionTrainConfig, resume: bool = True, overwrite: bool = False) -> TrainResult:
    """Train (resuming from the newest checkpoint in `out_dir` when there is one and `resume`), save,
    evaluate. The run holds `out_dir` for itself (`quintet.io.output_lock`); without `resume`, a folder
    with a checkpoint is refused unless `overwrite` (its checkpoints and model are deleted first)."""
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    out = Path(config.out_dir)
    with output_lock(out, "training run"):
        if overwrite and not resume:
            for path in (checkpoint_dir(out), out / "model"):
                if path.is_dir():
                    shutil.rmtree(path)
            (out / "train_result.json").unlink(missing_ok=True)
        elif not resume and latest_checkpoint(out) is not None:
            raise OutputInUseError(
                f"{checkpoint_dir(out)}: holds a checkpoint of an earlier run; pass --resume to continue it, "
                "or --overwrite to delete it and start over (or choose another out_dir)"
            )
        trainer = VisionTrainer(config)
        if resume:
            trainer.resume()
        return trainer.run()
