"""Images without torchvision: Pillow decodes, NumPy/PyTorch resize and crop.

`ImageFolder` follows torchvision's convention: `root/<class name>/**/<image>`, classes sorted by name,
label = index of the class. Images are kept at their own size; `batch(indices, resolution)` resizes
them for one training or evaluation batch. A file Pillow cannot decode raises `ImageLoadError` naming it.

Every dataset here has the same small surface, used by `quintet.train.vision`:
`classes`, `len(dataset)`, `batch(indices, resolution, train=False, generator=None) -> (images, labels)`
with images float32 (B, 3, r, r) in [0, 1] and labels int64 (B,).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class ImageLoadError(ValueError):
    """A file is not an image that Pillow can decode."""


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to float32 (3, H, W) in [0, 1] (RGB; grey and alpha are converted; 16-bit grey
    is scaled from [0, 65535], as Pillow itself reads 16-bit colour as 8-bit)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                if image.mode.startswith("I") or image.mode == "F":  # 16/32-bit grey, float
                    wide = (np.asarray(image), image.mode, image.format)
                else:
                    wide, rgb = None, image.convert("RGB")
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not an image file Pillow can read") from None
    except (
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as err:
        raise ImageLoadError(f"{path}: corrupt or truncated image ({type(err).__name__}: {err})") from None
    if wide is not None:
        return _wide_grey(*wide, path)
    array = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def _wide_grey(array: np.ndarray, mode: str, fmt: str | None, path: Path) -> torch.Tensor:
    """A 16-bit grey image (Pillow's modes I;16*, or I from a PNG, whose depth is at most 16 bits) scaled
    from [0, 65535] to [0, 1] at full precision: `convert("RGB")` would clip every value above 255 to white.
    32-bit integer and float images have no agreed range and are refused."""
    if not (mode.startswith("I;16") or (mode == "I" and fmt == "PNG")):
        kind = "float" if mode == "F" else "32-bit integer"
        raise ImageLoadError(
            f"{path}: a {kind} grey image (Pillow mode {mode!r}) has no agreed value range; convert it to "
            "8 or 16 bits per channel"
        )
    values = array.astype(np.float32)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ImageLoadError(
            f"{path}: grey values {int(values.min())}..{int(values.max())} outside the 16-bit range "
            "[0, 65535]"
        )
    return torch.from_numpy(values / 65535.0).expand(3, *values.shape).contiguous()


def save_image(image: torch.Tensor, path: str | os.PathLike) -> None:
    """Write float (3, H, W) in [0, 1] as an 8-bit image (format from the suffix), atomically."""
    from PIL import Image

    from quintet.io import atomic_path

    path = Path(path)
    array = image.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"{path}: unknown image suffix {path.suffix!r}; use one of {', '.join(IMAGE_EXTENSIONS)}"
        )
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format=fmt)


def resize(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with antialiasing of (C, H, W) or (B, C, H, W) to `size` (an int means square)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    batched = images.ndim == 4
    x = images if batched else images[None]
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)
    return x if batched else x[0]


def center_crop_resize(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize the shorter side to `resolution`, then take the central square: (C, r, r)."""
    _, h, w = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return resize(image[:, top : top + side, left : left + side], resolution)


def random_resized_crop(
    image: torch.Tensor,
    resolution: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """DeiT-style training crop: a random area fraction and aspect ratio, resized to (C, r, r)."""
    _, h, w = image.shape
    u = torch.rand(4, generator=generator).tolist()
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[0])
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1]
    aspect = math.exp(log_ratio)
    cw = max(1, min(w, round(math.sqrt(area * aspect))))
    ch = max(1, min(h, round(math.sqrt(area / aspect))))
    top = int(u[2] * (h - ch + 1))
    left = int(u[3] * (w - cw + 1))
    return resize(image[:, top : top + ch, left : left + cw], resolution)


class ImageFolder:
    """Images in `root/<class>/...` (torchvision's ImageFolder layout), decoded with Pillow on demand."""

    def __init__(self, root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such image folder")
        extensions = tuple(e.lower() for e in extensions)
        self.classes = sorted(
            d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
        if not self.classes:
            raise ValueError(f"{self.root}: no class folders (expected {self.root}/<class name>/<images>)")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for name in self.classes:
            files = sorted(
                p for p in (self.root / name).rglob("*") if p.is_file() and p.suffix.lower() in extensions
            )
            self.samples += [(p, self.class_to_idx[name]) for p in files]
        if not self.samples:
            raise ValueError(
                f"{self.root}: no images with suffix {', '.join(extensions)} in its class folders"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """The image at its own size (3, H, W) and its label."""
        path, label = self.samples[index]
        return load_image(path), label

    def batch(
        self,
        indices: Sequence[int],
        resolution: int,
        train: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images resized to r x r: a random crop and flip when training, else the centre square."""
        if train and generator is None:
            raise ValueError("ImageFolder.batch(train=True) needs a torch.Generator for its random crops")
        images, labels = [], []
        for i in indices:
            image, label = self[int(i)]
            if train:
                image = random_resized_crop(image, resolution, generator)
                if torch.rand(1, generator=generator).item() < 0.5:
                    image = image.flip(-1)
            else:
                image = center_crop_resize(image, resolution)
            images.append(image)
            labels.append(label)
        return torch.stack(images), torch.tensor(labels, dtype=torch.long)
