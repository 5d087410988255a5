"""Image data without torchvision: Pillow folders, clear errors on bad files, the procedural dataset."""

from __future__ import annotations

import pytest
import torch

from quintet.data.images import ImageFolder, ImageLoadError, load_image, save_image
from quintet.data.procedural_images import CLASSES, ProceduralImages, write_image_folder


def _write_folder(root, sizes=((20, 30), (41, 17), (64, 64))):
    ds = ProceduralImages(seed=5)
    for i, (h, w) in enumerate(sizes):
        save_image(ds.render([i], h, w)[0], root / ("a" if i % 2 else "b") / f"{i}.png")


def test_image_folder_loads_images_at_their_own_size(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "a" / "notes.txt").write_text("not an image, ignored by suffix")
    folder = ImageFolder(tmp_path)
    assert folder.classes == ["a", "b"] and len(folder) == 3
    sizes = sorted(tuple(folder[i][0].shape) for i in range(len(folder)))
    assert sizes == [(3, 20, 30), (3, 41, 17), (3, 64, 64)]
    image, label = folder[0]
    assert image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
    images, labels = folder.batch(range(3), 24)
    assert images.shape == (3, 3, 24, 24) and labels.tolist() == [0, 1, 1]
    g = torch.Generator().manual_seed(0)
    train_images, _ = folder.batch(range(3), 16, train=True, generator=g)
    assert train_images.shape == (3, 3, 16, 16)


def test_png_round_trip_is_exact_to_8_bits(tmp_path):
    image = torch.rand(3, 9, 13)
    save_image(image, tmp_path / "x.png")
    torch.testing.assert_close(load_image(tmp_path / "x.png"), (image * 255).round() / 255)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40),
        ("text.jpg", b"hello, I am not a JPEG"),
        ("empty.png", b""),
    ],
)
def test_corrupt_or_non_image_file_raises_an_error_naming_it(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=name):
        load_image(path)


def test_truncated_image_names_the_file(tmp_path):
    save_image(torch.rand(3, 64, 64), tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.png"):
        load_image(tmp_path / "cut.png")


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolder(tmp_path)
    (tmp_path / "cls").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path)
    (tmp_path / "cls" / "bad.png").write_bytes(b"garbage")
    with pytest.raises(ImageLoadError, match="bad.png"):
        ImageFolder(tmp_path).batch([0], 8)


def test_procedural_scenes_are_deterministic_and_independent_of_batching():
    ds = ProceduralImages(seed=1)
    a = ds.render([3, 4, 5], 48)
    b = torch.cat([ds.render([3], 48), ds.render([4, 5], 48)])
    torch.testing.assert_close(a, b)
    assert not torch.equal(ds.render([3], 48), ProceduralImages(seed=2).render([3], 48))
    assert ds.render([0], 30, 70).shape == (1, 3, 30, 70)
    assert len(CLASSES) == 10 and ds.num_classes == 10


def _texture_energy(ds, index, resolution):
    """High-pass energy inside the shape: what the texture adds on top of the flat fill."""
    image = ds.render([index], resolution)[0].mean(0)
    blurred = torch.nn.functional.avg_pool2d(image[None, None], 3, 1, 1, count_include_pad=False)[0, 0]
    return (image - blurred).pow(2).mean().item()


def test_texture_is_invisible_at_base_resolution_and_shows_natively_above_it():
    ds = ProceduralImages(seed=0)
    flat = ProceduralImages(seed=0, contrast=0.0)
    for index in range(4):
        base, flat_base = ds.render([index], 32), flat.render([index], 32)
        torch.testing.assert_close(base, flat_base)  # at 32 px the texture is band-limited away
        assert _texture_energy(ds, index, 96) > 5 * _texture_energy(flat, index, 96)
    # native rendering differs from upsampling the base image: the detail is new information
    up = torch.nn.functional.interpolate(ds.render([0], 32), size=128, mode="bilinear", align_corners=False)
    assert (ds.render([0], 128) - up).abs().mean() > 0.02


def test_written_folder_reads_back_with_class_names(tmp_path):
    ds = ProceduralImages(seed=3)
    paths = write_image_folder(ds, tmp_path, range(6), 40)
    folder = ImageFolder(tmp_path)
    assert len(folder) == 6 and set(folder.classes) <= set(CLASSES)
    for path, label in folder.samples:
        assert path.parent.name == folder.classes[label]
    assert all(p.is_file() for p in paths)
