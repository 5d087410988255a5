"""A procedural image dataset where resolution carries information.

Each image is a scene, fixed by (seed, index): one of five shapes (disk, square, triangle, cross, ring) on
a smooth background, filled with a fine oriented texture (horizontal or vertical stripes). The class is
shape x texture orientation: 10 classes. The scene is rendered natively at whatever size is asked for,
never upsampled:

- the shape is drawn from its signed distance with one pixel of antialiasing, so it is visible at every
  resolution, also the 32 px base;
- the texture is a sum of K sinusoids (frequencies log-stratified over [16, 256] cycles per image,
  directions within +-20 degrees of the class orientation, random phases). It is rendered band-limited:
  a sinusoid whose frequency is above 0.25 cycles per pixel fades out and is zero from 0.45 on, so nothing
  aliases. At 32 px every texture frequency is above that band and the orientation is invisible; from
  64 px on the lowest frequencies appear, and each higher resolution shows finer ones. The visible part
  is added to the shape's colour with the same RMS contrast (0.15) at every resolution.

So at base resolution a model can read only the shape (at best 50 % accuracy); above it, the texture
decides the other half of the label. An upsampled 32 px image carries no texture at all: upsampling does
not test the Adaptive Token Merger (plain average pooling is enough on it), native rendering does.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quintet.data.images import ImageFolder, save_image

SHAPES = ("disk", "square", "triangle", "cross", "ring")
TEXTURES = ("horizontal", "vertical")
CLASSES = tuple(f"{s}-{t}" for s in SHAPES for t in TEXTURES)


@dataclass
class Scenes:
    """Parameters of a batch of B scenes; lengths in image units (the image is [0, 1] x [0, 1])."""

    label: torch.Tensor  # (B,) int64: shape * 2 + texture
    center: torch.Tensor  # (B, 2) x, y
    size: torch.Tensor  # (B,) half-extent of the shape
    angle: torch.Tensor  # (B,) shape rotation, radians
    fg: torch.Tensor  # (B, 3) shape colour
    bg: torch.Tensor  # (B, 3) background colour at the centre
    bg_slope: torch.Tensor  # (B, 2) background brightness gradient along x, y
    freq: torch.Tensor  # (B, K) texture frequencies, cycles per image
    direction: torch.Tensor  # (B, K) wave-vector directions, radians
    phase: torch.Tensor  # (B, K)

    def to(self, device: torch.device | str) -> Scenes:
        return Scenes(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))

    @property
    def shape_id(self) -> torch.Tensor:
        return self.label // len(TEXTURES)

    @property
    def texture_id(self) -> torch.Tensor:
        return self.label % len(TEXTURES)


class ProceduralImages:
    """Shapes x texture orientation, rendered natively at any resolution; 10 classes.

    `num_images` bounds `len()` (an evaluation set); training can draw any index. Scenes depend only on
    (seed, index), so image i at 32 px and at 576 px is the same scene. Images are rendered on `device`
    (labels stay on the CPU).
    """

    classes = list(CLASSES)

    def __init__(
        self,
        num_images: int = 10_000,
        seed: int = 0,
        num_waves: int = 24,
        freq_range: tuple[float, float] = (16.0, 256.0),
        contrast: float = 0.15,
        direction_jitter_deg: float = 20.0,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_images < 1:
            raise ValueError(f"ProceduralImages.num_images = {num_images}: must be a positive integer")
        if not 0 < freq_range[0] < freq_range[1]:
            raise ValueError(f"ProceduralImages.freq_range = {freq_range}: need 0 < low < high")
        self.num_images = num_images
        self.seed = seed
        self.num_waves = num_waves
        self.freq_range = freq_range
        self.contrast = contrast
        self.direction_jitter = math.radians(direction_jitter_deg)
        self.device = torch.device(device)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.num_images

    # ---------------------------------------------------------------- scenes
    def scenes(self, indices: Sequence[int]) -> Scenes:
        rows = [self._scene(int(i)) for i in indices]
        return Scenes(*(torch.as_tensor(np.stack([r[k] for r in rows])) for k in range(10)))

    def _scene(self, index: int) -> tuple[np.ndarray, ...]:
        rng = np.random.default_rng([self.seed, index])
        label = rng.integers(len(CLASSES))
        center = 0.5 + rng.uniform(-0.08, 0.08, size=2)
        size = rng.uniform(0.26, 0.36)
        angle = rng.uniform(0, 2 * math.pi)
        while True:
            fg, bg = rng.uniform(0.15, 0.85, size=3), rng.uniform(0.15, 0.85, size=3)
            if abs(fg.mean() - bg.mean()) > 0.2:
                break
        bg_slope = rng.uniform(-0.15, 0.15, size=2)
        k = self.num_waves
        lo, hi = math.log2(self.freq_range[0]), math.log2(self.freq_range[1])
        freq = 2.0 ** (lo + (hi - lo) * (np.arange(k) + rng.uniform(size=k)) / k)
        # horizontal stripes vary along y: wave vector at 90 degrees; vertical stripes: at 0 degrees
        base = math.pi / 2 if CLASSES[label].endswith("horizontal") else 0.0
        direction = base + rng.uniform(-self.direction_jitter, self.direction_jitter, size=k)
        phase = rng.uniform(0, 2 * math.pi, size=k)
        return (
            np.int64(label),
            center.astype(np.float32),
            np.float32(size),
            np.float32(angle),
            fg.astype(np.float32),
            bg.astype(np.float32),
            bg_slope.astype(np.float32),
            freq.astype(np.float32),
            direction.astype(np.float32),
            phase.astype(np.float32),
        )

    # ---------------------------------------------------------------- rendering
    def render(self, indices: Sequence[int], height: int, width: int | None = None) -> torch.Tensor:
        """Images (B, 3, height, width) in [0, 1], rendered natively at that size."""
        return render_scenes(self.scenes(indices).to(self.device), height, width or height, self.contrast)

    def batch(
        self,
        indices: Sequence[int],
        resolution: int,
        train: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B, 3, r, r), labels (B,)). Scenes are already random: no augmentation."""
        scenes = self.scenes(indices)
        images = render_scenes(scenes.to(self.device), resolution, resolution, self.contrast)
        return images, scenes.label


def _box_sdf(x: torch.Tensor, y: torch.Tensor, bx: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
    dx, dy = x.abs() - bx, y.abs() - by
    outside = torch.sqrt(dx.clamp(min=0) ** 2 + dy.clamp(min=0) ** 2)
    return outside + torch.maximum(dx, dy).clamp(max=0)


def _triangle_sdf(x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Equilateral triangle of circumradius-like size r (Inigo Quilez's exact distance)."""
    k = math.sqrt(3.0)
    px = x.abs() - r
    py = y + r / k
    fold = px + k * py > 0
    px, py = torch.where(fold, (px - k * py) / 2, px), torch.where(fold, (-k * px - py) / 2, py)
    px = px - torch.clamp(px, min=torch.zeros_like(px) - 2 * r, max=torch.zeros_like(px))
    return -torch.sqrt(px**2 + py**2) * torch.sign(py)


def _shape_sdf(shape: int, u: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    name = SHAPES[shape]
    if name == "disk":
        return torch.sqrt(u**2 + v**2) - s
    if name == "square":
        return _box_sdf(u, v, 0.85 * s, 0.85 * s)
    if name == "triangle":
        return _triangle_sdf(u, v, 1.1 * s)
    if name == "cross":
        return torch.minimum(_box_sdf(u, v, s, 0.36 * s), _box_sdf(u, v, 0.36 * s, s))
    return (torch.sqrt(u**2 + v**2) - 0.72 * s).abs() - 0.28 * s


def band_limit(cycles_per_pixel: torch.Tensor) -> torch.Tensor:
    """1 up to 0.25 cycles/pixel, smoothly down to 0 at 0.45 and above (no aliasing)."""
    t = ((0.45 - cycles_per_pixel) / 0.2).clamp(0, 1)
    return t * t * (3 - 2 * t)


def render_scenes(scenes: Scenes, height: int, width: int, contrast: float = 0.15) -> torch.Tensor:
    """Render a batch of scenes natively at height x width: (B, 3, H, W) float32 in [0, 1]."""
    if height < 1 or width < 1:
        raise ValueError(f"render_scenes: size {height} x {width} must be at least 1 x 1")
    b, device = scenes.label.shape[0], scenes.freq.device
    ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width

    # texture: sum_k a_k cos(kx x + ky y + phase), evaluated separably as a (B, H, 2K) @ (B, 2K, W) product
    fx = scenes.freq * torch.cos(scenes.direction)
    fy = scenes.freq * torch.sin(scenes.direction)
    amp = band_limit(torch.sqrt((fx / width) ** 2 + (fy / height) ** 2))
    arg_y = 2 * math.pi * fy[:, None, :] * ys[None, :, None] + scenes.phase[:, None, :]
    arg_x = 2 * math.pi * fx[:, :, None] * xs[None, None, :]
    left = torch.cat([amp[:, None, :] * torch.cos(arg_y), -amp[:, None, :] * torch.sin(arg_y)], dim=2)
    right = torch.cat([torch.cos(arg_x), torch.sin(arg_x)], dim=1)
    texture = torch.bmm(left, right)
    rms = torch.sqrt((amp**2).sum(-1) / 2)
    texture = texture * (contrast / rms.clamp(min=1e-6))[:, None, None]

    # shape coverage from the signed distance, one pixel of antialiasing
    px = xs[None, None, :] - scenes.center[:, 0, None, None]
    py = ys[None, :, None] - scenes.center[:, 1, None, None]
    cos, sin = torch.cos(scenes.angle)[:, None, None], torch.sin(scenes.angle)[:, None, None]
    u, v = cos * px + sin * py, -sin * px + cos * py
    sdf = torch.empty(b, height, width, device=device)
    size = scenes.size[:, None, None]
    for shape in scenes.shape_id.unique().tolist():
        sel = scenes.shape_id == shape
        sdf[sel] = _shape_sdf(shape, u[sel], v[sel], size[sel])
    coverage = (0.5 - sdf * min(height, width)).clamp_(0, 1)

    # out = (bg + slope . (x - 0.5, y - 0.5)) * (1 - coverage) + (fg + texture) * coverage, per channel
    gradient = scenes.bg_slope[:, 0, None, None] * (xs[None, None, :] - 0.5) + scenes.bg_slope[
        :, 1, None, None
    ] * (ys[None, :, None] - 0.5)
    uncovered = 1 - coverage
    base = gradient.mul_(uncovered).addcmul_(texture, coverage)
    out = torch.empty(b, 3, height, width, device=device)
    for c in range(3):
        torch.addcmul(base, uncovered, scenes.bg[:, c, None, None], out=out[:, c])
        out[:, c].addcmul_(coverage, scenes.fg[:, c, None, None])
    return out.clamp_(0, 1)


def write_image_folder(
    dataset: ProceduralImages,
    out_dir: str | os.PathLike,
    indices: Sequence[int],
    resolution: int | tuple[int, int],
    suffix: str = ".png",
) -> list[Path]:
    """Render `indices` and write them as `out_dir/<class>/<index>.png` (the ImageFolder layout)."""
    out_dir = Path(out_dir)
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    paths = []
    for start in range(0, len(indices), 32):
        chunk = list(indices[start : start + 32])
        images = dataset.render(chunk, h, w).cpu()
        labels = dataset.scenes(chunk).label.tolist()
        for index, image, label in zip(chunk, images, labels, strict=True):
            path = out_dir / dataset.classes[label] / f"{index:06d}{suffix}"
            save_image(image, path)
            paths.append(path)
    return paths


def make_dataset(spec: str, seed: int = 0, num_images: int = 10_000, device: str = "cpu"):  # noqa: ANN201
    """`procedural` -> ProceduralImages(seed) rendered on `device`; anything else is an ImageFolder path."""
    if spec == "procedural":
        return ProceduralImages(num_images=num_images, seed=seed, device=device)
    return ImageFolder(spec)
