"""The `quintet` command, run as a user runs it: a real subprocess."""

import json
import subprocess
import sys

import pytest


def quintet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quintet", *args], capture_output=True, text=True, timeout=300
    )


def test_info_of_jamba_v01_computes_the_papers_table_1_row():
    result = quintet("model", "info", "--preset", "jamba-v0.1", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["layout"] == "mmmmAmmm" * 4
    assert info["moe_layout"] == "-E" * 16
    assert round(info["parameters"]["total"] / 1e9, 1) == 51.6  # paper: 52B total
    assert round(info["parameters"]["active"] / 1e9, 1) == 12.1  # paper: 12B active
    assert info["context_length"] == 262144 and info["dtype"] == "bfloat16"
    assert info["cache_bytes"]["kv"] == 4 * 2**30  # paper: 4GB K/V cache at 256K tokens
    assert info["cache_bytes"]["all_attention"] == 32 * 2**30  # Mixtral-like all-attention shape: 32GB

    text = quintet("model", "info", "--preset", "jamba-v0.1").stdout
    assert "4 GiB at 262,144 tokens" in text and "32 GiB" in text and "51.6 B total" in text


def test_init_info_and_generate_from_a_folder(tmp_path):
    out = tmp_path / "tiny"
    result = quintet("model", "init", "--preset", "jamba-tiny", "--out", str(out), "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    info = json.loads(quintet("model", "info", str(out), "--context", "1000", "--json").stdout)
    assert info["layout"] == "mmAm"
    gen = quintet("generate", "--model", str(out), "--prompt", "Hello", "--max-new-tokens", "8")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("Hello")
    batch = quintet(
        "generate", "--model", str(out), "--prompt", "a", "--prompt", "bc", "--max-new-tokens", "4"
    )
    rows = [json.loads(line) for line in batch.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["a", "bc"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("model", "info", "--preset", "jamba-huge"), "unknown Jamba preset 'jamba-huge'"),
        (("model", "info"), "give a model folder or --preset NAME"),
        (
            ("generate", "--model", "/nonexistent/model", "--prompt", "x"),
            "/nonexistent/model: no such model folder",
        ),
    ],
)
def test_errors_are_one_clear_line(args, fragment):
    result = quintet(*args)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_empty_prompt_is_refused(tmp_path):
    quintet("model", "init", "--preset", "jamba-tiny", "--out", str(tmp_path))
    result = quintet("generate", "--model", str(tmp_path), "--prompt", "")
    assert result.returncode == 2 and "prompt: empty text" in result.stderr
