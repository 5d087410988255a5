"""The error boundary, through the real command line (`python -m quintet ...` as a subprocess): each bad
input gives exit code 2 and one line naming the file, field or value; a bug gives exit code 1 and one
line; `--debug` keeps the traceback."""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quintet.commands import expected_error_message, run_command

ROOT = Path(__file__).resolve().parents[1]


def _drop_file_capabilities() -> None:
    """In the child, before exec: root without CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER, so
    file permissions apply to it as to any user (PR_CAPBSET_DROP; the exec'd program keeps the rest)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def quintet(*args: str, stdout=subprocess.PIPE, as_user: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quintet", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
        cwd=ROOT,
        preexec_fn=_drop_file_capabilities if as_user and os.geteuid() == 0 else None,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    err = result.stderr.strip()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in err and "\n" not in err, err
    assert err.startswith("quintet: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from quintet.models.jamba.create import create_model

    folder = tmp_path_factory.mktemp("cli-errors") / "model"
    create_model("jamba-tiny", folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def truncated(model, tmp_path_factory) -> Path:
    import shutil

    folder = tmp_path_factory.mktemp("cli-errors") / "truncated"
    shutil.copytree(model, folder)
    weights = folder / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    return folder


def test_truncated_safetensors_in_generate_and_quantize(truncated, tmp_path):
    weights = str(truncated / "model.safetensors")
    assert_one_line_error(
        quintet("generate", "--model", str(truncated), "--prompt", "hi"), weights, "truncated"
    )
    result = quintet("deploy", "quantize", str(truncated), "--out", str(tmp_path / "fp4"))
    assert_one_line_error(result, weights, "corrupt")


def test_garbled_safetensors_header(model, tmp_path):
    import shutil

    folder = tmp_path / "garbled"
    shutil.copytree(model, folder)
    (folder / "model.safetensors").write_bytes((40).to_bytes(8, "little") + b"{not json" + bytes(64))
    assert_one_line_error(quintet("generate", "--model", str(folder), "--prompt", "hi"), "model.safetensors")


def test_corrupt_tokenizer_json(model, tmp_path):
    import shutil

    folder = tmp_path / "badtok"
    shutil.copytree(model, folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    result = quintet("generate", "--model", str(folder), "--prompt", "hi")
    assert_one_line_error(result, str(folder / "tokenizer.json"), "not a readable tokenizer.json")


def test_wrong_type_in_align_config_fails_at_read_time(model, tmp_path):
    (tmp_path / "sft.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    config = tmp_path / "sft.toml"
    config.write_text(
        f'[model]\npath = "{model}"\n[data]\ntrain = "{tmp_path / "sft.jsonl"}"\n'
        f'[sft]\nlr = "x"\n[run]\nout_dir = "{tmp_path / "out"}"\n'
    )
    assert_one_line_error(
        quintet("align", "sft", str(config)), f"{config}:6:", "lr = 'x'", "expected a number"
    )
    assert not (tmp_path / "out" / "model").exists()  # stopped at the file, before any work


def test_wrong_types_in_train_and_curation_configs(tmp_path):
    config = tmp_path / "train.toml"
    config.write_text(
        '[model]\npreset = "jamba-tiny"\n[data]\nshards = "x"\n'
        '[[stages]]\nname = "A"\ntokens = 100\nmixture = { en = 1.0 }\nlr = "fast"\n'
    )
    assert_one_line_error(quintet("train", "lm", str(config)), f"{config}:9:", "lr = 'fast'", "a number")
    curation = tmp_path / "curation.toml"
    curation.write_text(
        'languages = ["en"]\n[[inputs]]\ntype = "jsonl"\npath = "web"\n'
        '[[steps]]\ntype = "numbers"\nmax_digit_fraction = "many"\n'
    )
    result = quintet("data", "curate", str(curation), "--out", str(tmp_path / "cur"))
    assert_one_line_error(result, f"{curation}:7:", "max_digit_fraction = 'many'", "expected a number")


def test_read_only_output_folder(tmp_path):
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = quintet("model", "init", "--preset", "jamba-tiny", "--out", str(locked / "m"), as_user=True)
        assert_one_line_error(result, str(locked / "m"), "permission denied")
        result = quintet("data", "demo-corpus", "--out", str(locked / "corpus"), as_user=True)
        assert_one_line_error(result, str(locked / "corpus"), "permission denied")
    finally:
        locked.chmod(0o755)


def test_full_disk_behind_stdout():
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    with open("/dev/full", "w") as full:
        result = quintet("model", "info", "--preset", "jamba-tiny", stdout=full)
    assert_one_line_error(result, "standard output", "no space left")


def test_full_disk_message_names_the_file():
    err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/train/metrics.jsonl")
    message = expected_error_message(err)
    assert message.startswith("/runs/train/metrics.jsonl: no space left on the device")


def test_vitar_predict_resolution_zero(tmp_path):
    from PIL import Image

    from quintet.data.procedural_images import ProceduralImages
    from quintet.models.vitar import build_model, preset_config

    build_model(preset_config("vitar-tiny", labels=ProceduralImages.classes)).save_pretrained(tmp_path / "v")
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    argv = ["vitar", "predict", "--model", str(tmp_path / "v"), "--resolution", "0", str(tmp_path / "a.png")]
    assert_one_line_error(quintet(*argv), "--resolution 0", "at least the model's patch size")


def test_chat_template_stopped_by_the_sandbox(tmp_path):
    from quintet.data.tokenizer_training import train_tokenizer
    from quintet.models.jamba.create import create_model
    from quintet.tokenizer import load_tokenizer

    folder = tmp_path / "model"
    train_tokenizer(["the cat sat on the mat"] * 20, folder, vocab_size=300, min_frequency=1)
    create_model("jamba-tiny", folder, vocab_size=load_tokenizer(folder).vocab_size)  # the tokenizer's size
    template = folder / "chat_template.jinja"
    template.write_text("{% for m in messages %}{{ m.__class__.__mro__ }}{{ m['content'] }}{% endfor %}")
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (tmp_path / "sft.jsonl").write_text(json.dumps(row) + "\n")
    config = tmp_path / "sft.toml"
    config.write_text(
        f'[model]\npath = "{folder}"\n[data]\ntrain = "{tmp_path / "sft.jsonl"}"\n'
        f'[run]\nout_dir = "{tmp_path / "out"}"\n'
    )
    assert_one_line_error(quintet("align", "sft", str(config)), str(template), "stopped by the sandbox")


def test_debug_keeps_the_traceback(tmp_path):
    """--debug before or after the sub-command: the same error with its traceback, exit code 1."""
    argv = ["model", "info", "--preset", "no-such-preset"]
    plain = quintet(*argv)
    assert_one_line_error(plain, "no-such-preset")
    for debug in (["--debug", *argv], [*argv, "--debug"]):
        result = quintet(*debug)
        assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr, result.stderr


def test_a_bug_is_one_line_with_exit_code_1(capsys):
    def handler(args: argparse.Namespace) -> int:
        return {}["missing"]  # a KeyError: not bad input, a bug

    assert run_command(argparse.Namespace(func=handler, debug=False)) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "a bug" in err and "KeyError: 'missing'" in err and "rerun with --debug" in err
    with pytest.raises(KeyError):
        run_command(argparse.Namespace(func=handler, debug=True))


def test_every_entry_point_goes_through_the_boundary(tmp_path):
    """`python -m quintet.train` and `python -m quintet.demo` answer bad input as `quintet` does."""
    missing = tmp_path / "missing.toml"
    for module in ("quintet.train",):
        result = subprocess.run(
            [sys.executable, "-m", module, "lm", str(missing)], capture_output=True, text=True, cwd=ROOT
        )
        err = result.stderr.strip()
        assert result.returncode == 2 and "\n" not in err and str(missing) in err, result.stderr
    demo = subprocess.run(
        [sys.executable, "-m", "quintet.demo", "--out", "/dev/null/demo", "--skip-vitar"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert demo.returncode == 2 and "Traceback" not in demo.stderr, demo.stderr
    assert demo.stderr.strip().splitlines()[-1].startswith("python -m quintet.demo: error: /dev/null")
