"""Checkpoint folders: sharding, atomic writes, and one error listing every bad tensor."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from quintet.models.jamba import CheckpointError, JambaConfig, JambaForCausalLM


@pytest.fixture
def tiny(tmp_path):
    model = JambaForCausalLM(JambaConfig.from_preset("jamba-tiny"))
    model.save_pretrained(tmp_path / "m")
    return model, tmp_path / "m"


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_folder_layout(tiny):
    _, path = tiny
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert "model.layers.2.self_attn.q_proj.weight" in load_file(path / "model.safetensors")
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2


def test_sharded_round_trip_and_switch_back(tiny, tmp_path):
    model, _ = tiny
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_size="1MB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert _same(JambaForCausalLM.from_pretrained(out), model)
    model.save_pretrained(out)  # back to one file: the stale shards and index go
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert _same(JambaForCausalLM.from_pretrained(out), model)


def test_missing_unexpected_and_misshaped_tensors_in_one_error(tiny):
    _, path = tiny
    state = load_file(path / "model.safetensors")
    del state["model.layers.0.mamba.A_log"]
    del state["lm_head.weight"]
    state["model.layers.1.feed_forward.router.weight"] = torch.zeros(5, 128)
    state["model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        JambaForCausalLM.from_pretrained(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "missing tensor: model.layers.0.mamba.A_log (expected shape [256, 16])" in msg
    assert "missing tensor: lm_head.weight" in msg
    assert "unexpected tensor: model.layers.9.extra.weight" in msg
    assert "wrong shape: model.layers.1.feed_forward.router.weight: found [5, 128], expected [4, 128]" in msg


def test_pickle_only_folder_is_refused(tmp_path):
    JambaConfig.from_preset("jamba-tiny").save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="only pickle weights"):
        JambaForCausalLM.from_pretrained(tmp_path)


def test_missing_folder_and_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        JambaForCausalLM.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        JambaForCausalLM.from_pretrained(tmp_path)


def test_interrupted_save_keeps_previous_checkpoint(tiny, monkeypatch):
    model, path = tiny
    before = (path / "model.safetensors").read_bytes()
    import safetensors.torch

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(path)
    assert (path / "model.safetensors").read_bytes() == before
    assert not list(path.glob(".*.tmp"))


def test_tied_embeddings_round_trip(tmp_path):
    model = JambaForCausalLM(JambaConfig.from_preset("jamba-tiny", tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    again = JambaForCausalLM.from_pretrained(tmp_path)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert _same(again, model)


def test_bfloat16_load(tiny):
    _, path = tiny
    model = JambaForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    out = model(torch.randint(0, 1024, (1, 6)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
