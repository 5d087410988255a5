"""`quintet vitar train | eval | predict` through argparse, on tiny models and generated images."""

from __future__ import annotations

import argparse
import json

import pytest

from quintet.cli import add_vitar_parser
from quintet.data.images import ImageLoadError
from quintet.data.procedural_images import ProceduralImages, write_image_folder
from quintet.models.vitar import build_model, preset_config


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="quintet")
    add_vitar_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def model_dir(tmp_path):
    labels = ProceduralImages.classes
    build_model(preset_config("vitar-tiny", labels=labels)).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_eval_prints_accuracy_and_flops_per_resolution(model_dir, capsys):
    argv = [
        "vitar",
        "eval",
        "--model",
        str(model_dir),
        "--resolutions",
        "32,64",
        "--num-images",
        "6",
        "--json",
    ]
    assert _run(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["resolution"] for r in rows] == [32, 64]
    assert all(r["total"] == 6 and r["flops"] > 0 for r in rows)


def test_predict_reads_files_of_any_size(model_dir, tmp_path, capsys):
    ds = ProceduralImages(seed=9)
    paths = write_image_folder(ds, tmp_path / "imgs", [0], (40, 40))
    paths += write_image_folder(ds, tmp_path / "imgs", [1], (70, 130))
    assert (
        _run(["vitar", "predict", "--model", str(model_dir), "--top-k", "2", "--json", *map(str, paths)]) == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(x["width"], x["height"]) for x in lines] == [(40, 40), (130, 70)]
    assert all(len(x["top"]) == 2 and x["top"][0][0] in ProceduralImages.classes for x in lines)


def test_predict_names_a_corrupt_file(model_dir, tmp_path):
    bad = tmp_path / "holiday.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a whole JPEG")
    with pytest.raises(ImageLoadError, match="holiday.jpg"):
        _run(["vitar", "predict", "--model", str(model_dir), str(bad)])


def test_train_from_a_toml_config(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(
        'model = "vitar-tiny"\nresolutions = [32, 48]\nsteps = 2\nbatch_size = 2\nwarmup_steps = 1\n'
        "progress = false\neval_resolutions = [32]\neval_images = 2\n"
        "[model_overrides]\nhidden_size = 32\nnum_hidden_layers = 1\n"
    )
    assert _run(["vitar", "train", str(config), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "trained 2 steps" in out and "32px" in out
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_bad_resolutions_are_rejected(model_dir):
    with pytest.raises(SystemExit):
        _run(["vitar", "eval", "--model", str(model_dir), "--resolutions", "32,abc"])
