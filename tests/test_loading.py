"""One loader for every model folder: float and FP4 Jamba, transformers-written Jamba, ViTAR."""

import json

import pytest
import torch

from quintet.deploy.convert import quantize_folder
from quintet.deploy.engine import JambaEngine
from quintet.eval.perplexity import evaluate_perplexity
from quintet.loading import ModelFolderError, load_model, load_model_and_tokenizer
from quintet.models.jamba import JambaConfig, JambaForCausalLM
from quintet.models.jamba.create import create_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    create_model("jamba-tiny", root / "float", seed=0)
    quantize_folder(root / "float", root / "fp4", group_size=32)
    return root


def test_each_kind_of_folder_opens(folders):
    assert isinstance(load_model(folders / "float"), JambaForCausalLM)
    engine, tokenizer = load_model_and_tokenizer(folders / "fp4")
    assert isinstance(engine, JambaEngine) and tokenizer.vocab_size <= engine.config.vocab_size


def test_decode_activations_are_chosen_at_load(folders, capsys):
    """`activations` reaches the FP4 engine (`quintet generate --activations int8` runs); a wrong value or
    int8 for a float folder is one clear error, and the CLI refuses it with exit code 2."""
    from quintet.cli import main
    from quintet.kernels.m0e4_cpu import int8_activations_available

    engine = load_model(folders / "fp4", activations="int8")
    assert engine.activations == "int8"
    assert load_model(folders / "fp4", activations="float32").activations == "float32"
    default = "int8" if int8_activations_available() else "float32"  # where integer dot products run
    assert load_model(folders / "fp4").activations == default
    with pytest.raises(ValueError, match="must be one of float32, int8"):
        load_model(folders / "fp4", activations="int4")
    with pytest.raises(ValueError, match="applies to FP4 folders"):
        load_model(folders / "float", activations="int8")
    args = ["generate", "--model", str(folders / "fp4"), "--prompt", "ab", "--max-new-tokens", "4"]
    assert main([*args, "--activations", "int8"]) == 0
    assert capsys.readouterr().out.startswith("ab")
    with pytest.raises(SystemExit) as stop:
        main([*args, "--activations", "fp8"])
    assert stop.value.code == 2


def test_a_transformers_written_jamba_folder_opens(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = JambaForCausalLM(JambaConfig.from_preset("jamba-tiny"))
    config = transformers.JambaConfig(**ours.config.to_dict())
    theirs = transformers.JambaForCausalLM(config)
    theirs.load_state_dict(ours.state_dict(), strict=False)
    theirs.save_pretrained(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)


def test_perplexity_runs_on_the_fp4_folder(folders, tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text(
        "".join(json.dumps({"text": "the quick brown fox " * 20, "lang": "en"}) + "\n" for _ in range(3))
    )
    fp32 = evaluate_perplexity(folders / "float", [texts])["languages"]["en"]["perplexity"]
    fp4 = evaluate_perplexity(folders / "fp4", [texts])["languages"]["en"]["perplexity"]
    assert fp32 > 1 and fp4 > 1 and fp4 != fp32
    assert abs(fp4 - fp32) / fp32 < 0.2  # 4-bit weights of a random model: close, not equal


def test_a_folder_that_is_no_model_is_named(tmp_path):
    with pytest.raises(ModelFolderError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelFolderError, match="model_type = 'llama': quintet opens jamba, vitar, vit"):
        load_model(tmp_path)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A Jamba folder written by transformers (its own save_pretrained), random jamba-tiny weights."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    config = transformers.JambaConfig(**JambaConfig.from_preset("jamba-tiny").to_dict())
    folder = tmp_path_factory.mktemp("hf") / "model"
    transformers.JambaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("which", ["fp4", "transformers"])
def test_every_model_command_runs_on_the_folder(which, folders, hf_folder, tmp_path, capsys):
    from quintet.cli import main

    model = str(folders / "fp4" if which == "fp4" else hf_folder)
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": "a short held-out text " * 8, "lang": "en"}) + "\n")
    task = tmp_path / "task.jsonl"
    task.write_text(
        json.dumps({"question": "2 + 2 =", "choices": ["4", "5"], "answer": 0, "lang": "en"}) + "\n"
    )
    prompts = tmp_path / "redteam.jsonl"
    rows = [
        {"id": "1", "category": "cyber", "lang": "en", "prompt": "p", "reference": "r", "kind": "harmful"},
        {"id": "2", "category": "cyber", "lang": "en", "prompt": "q", "reference": "r", "kind": "benign"},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    commands = [
        ["generate", "--model", model, "--prompt", "hello", "--max-new-tokens", "4"],
        ["eval", "perplexity", "--model", model, "--data", str(texts)],
        ["eval", "mc", "--model", model, "--task", str(task)],
        ["eval", "redteam", "--model", model, "--prompts", str(prompts), "--out", str(tmp_path / "rt"),
         "--max-new-tokens", "4"],
        ["deploy", "plan", model, "--kind", "decode"],
    ]  # fmt: skip
    for argv in commands:
        assert main(argv) == 0, argv
    out = capsys.readouterr().out
    assert "perplexity" in out and '"acc"' in out and "harmful compliance" in out and "decode step" in out


def test_training_starts_from_a_float_folder_only(folders, hf_folder):
    from quintet.loading import load_trainable_model

    assert isinstance(load_trainable_model(folders / "float"), JambaForCausalLM)
    assert isinstance(load_trainable_model(hf_folder), JambaForCausalLM)
    with pytest.raises(
        ModelFolderError, match="an FP4 .quantized. folder: training and alignment start from"
    ):
        load_trainable_model(folders / "fp4")
