"""`quintet deploy quantize|plan` through argparse, and the demo step."""

import argparse
import json

from quintet.demo.deploy import run_deploy_demo
from quintet.deploy.commands import add_deploy_parser
from quintet.deploy.engine import JambaEngine
from quintet.loading import load_model
from quintet.models.jamba.create import create_model


def _parse(argv):
    parser = argparse.ArgumentParser(prog="quintet")
    add_deploy_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_quantize_command(tmp_path, capsys):
    create_model("jamba-tiny", tmp_path / "m", seed=0)
    args = _parse(["deploy", "quantize", str(tmp_path / "m"), "--out", str(tmp_path / "q"), "--group", "32"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "modules in M0E4 (group 32, rtn)" in out and "MiB ->" in out
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["group_size"] == 32
    assert isinstance(load_model(tmp_path / "q"), JambaEngine)


def test_deploy_demo_prints_size_and_speed(tmp_path, capsys):
    create_model("jamba-tiny", tmp_path / "m", seed=0)
    run_deploy_demo(tmp_path / "m", tmp_path / "q")
    out = capsys.readouterr().out
    assert "weights:" in out and "(FP4;" in out
    assert "float32" in out and "FP4 engine" in out and "decode" in out
    assert "greedy tokens equal to float32's:" in out
