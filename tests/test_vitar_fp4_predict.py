"""`quintet vitar predict` on an FP4 folder written by `quintet deploy quantize`, at any image size."""

import numpy as np
from PIL import Image

from quintet.deploy.convert import quantize_folder
from quintet.eval.vision import predict_files
from quintet.models.vitar import build_model, preset_config


def test_fp4_vitar_classifies_like_the_float_model(tmp_path):
    build_model(preset_config("vitar-tiny")).eval().save_pretrained(tmp_path / "float")
    quantize_folder(tmp_path / "float", tmp_path / "fp4", group_size=32)
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(32, 32), (70, 50), (96, 130)]):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(paths[-1])
    float_preds = predict_files(tmp_path / "float", paths, top_k=10)
    fp4_preds = predict_files(tmp_path / "fp4", paths, top_k=10)
    for a, b in zip(float_preds, fp4_preds, strict=True):
        assert (a.height, a.width) == (b.height, b.width)
        pa, pb = dict(a.top), dict(b.top)
        assert set(pa) == set(pb)
        assert max(abs(pa[k] - pb[k]) for k in pa) < 0.05


def test_vitar_eval_command_runs_on_an_fp4_folder(tmp_path, capsys):
    import argparse

    from quintet.cli import add_vitar_parser

    build_model(preset_config("vitar-tiny")).eval().save_pretrained(tmp_path / "float")
    quantize_folder(tmp_path / "float", tmp_path / "fp4", group_size=32)
    parser = argparse.ArgumentParser()
    add_vitar_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["vitar", "eval", "--model", str(tmp_path / "fp4"), "--resolutions", "32", "--num-images", "8"]
    )
    assert args.func(args) == 0
    assert "32px" in capsys.readouterr().out
