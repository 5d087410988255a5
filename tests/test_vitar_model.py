"""ViTAR / ViT models: presets, config validation, save/load, counted FLOPs."""

from __future__ import annotations

import json

import pytest
import torch

from quintet.models.vitar import (
    CheckpointError,
    ConfigError,
    ViT,
    ViTAR,
    ViTARConfig,
    ViTConfig,
    build_model,
    count_flops,
    load_config,
    load_model,
    preset_config,
)
from quintet.models.vitar.flops import count_flops_by_module


def test_presets_have_the_paper_widths():
    s, b = preset_config("vitar-s"), preset_config("vitar-b")
    assert (s.hidden_size, s.num_hidden_layers, s.num_attention_heads, s.patch_size, s.grid_size) == (
        384,
        12,
        6,
        16,
        14,
    )
    assert (b.hidden_size, b.num_hidden_layers, b.num_attention_heads) == (768, 12, 12)
    tiny = preset_config("vitar-tiny")
    assert (tiny.image_size, tiny.patch_size, tiny.grid_size) == (32, 4, 8)
    assert isinstance(preset_config("vit-tiny"), ViTConfig)
    with pytest.raises(ConfigError, match="vitar-tiny"):
        preset_config("vitar-huge")


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("grid_size", 0, "grid_size = 0"),
        ("merger", "maxpool", "merger = 'maxpool'.*atm, avgpool"),
        ("pos_embed", "sincos", "pos_embed = 'sincos'.*fpe, interpolated"),
        ("num_attention_heads", 5, "num_attention_heads = 5: must divide hidden_size = 64"),
        ("fpe_offset", 2.0, "fpe_offset = 2.0"),
        ("image_mean", (0.5,), "image_mean"),
        ("labels", ["a", "b"], "labels has 2 names"),
    ],
)
def test_config_errors_name_field_value_and_valid(field, value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        preset_config("vitar-tiny", **{field: value})


def test_config_from_dict_rejects_unknown_fields_with_a_hint(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'grid_size'"):
        ViTARConfig.from_dict({"grid_sise": 8})


@pytest.mark.parametrize("preset", ["vitar-tiny", "vit-tiny"])
def test_save_and_load_round_trip(tmp_path, preset):
    torch.manual_seed(0)
    model = build_model(preset_config(preset, labels=[f"c{i}" for i in range(10)])).eval()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == ("vitar" if preset.startswith("vitar") else "vit")
    loaded = load_model(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.config == model.config
    x = torch.rand(2, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert load_config(tmp_path / "m").labels[3] == "c3"


def test_load_reports_mismatched_weights_and_refuses_pickles(tmp_path):
    build_model(preset_config("vitar-tiny")).save_pretrained(tmp_path / "m")
    preset_config("vitar-tiny", hidden_size=32).save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="wrong shape: cls_token"):
        load_model(tmp_path / "m")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "pytorch_model.bin").write_bytes(b"x")
    preset_config("vitar-tiny").save_pretrained(tmp_path / "p")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_model(tmp_path / "p")


def test_vitar_cost_is_bounded_while_vit_grows_quadratically():
    vitar = build_model(preset_config("vitar-tiny")).eval()
    vit = build_model(preset_config("vit-tiny")).eval()
    assert isinstance(vitar, ViTAR) and isinstance(vit, ViT)
    assert vitar.num_tokens(256, 256) == 1 + 64 and vit.num_tokens(256, 256) == 1 + 64 * 64
    f32, f256 = (count_flops(vitar, torch.rand(1, 3, r, r)) for r in (32, 256))
    v32, v256 = (count_flops(vit, torch.rand(1, 3, r, r)) for r in (32, 256))
    assert f256 / f32 < 15 and v256 / v32 > 64


def test_counted_flops_include_attention_and_the_einsum_merger():
    vit = build_model(preset_config("vit-tiny")).eval()
    by_module = count_flops_by_module(vit, torch.rand(1, 3, 32, 32))
    n, d, hidden = 65, 64, 256
    per_block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * hidden
    assert by_module["blocks"] == 4 * per_block
    vitar = build_model(preset_config("vitar-tiny")).eval()
    merger = count_flops_by_module(vitar, torch.rand(1, 3, 64, 64))["merger"]
    cells, keys = 64, 4
    linear = 2 * cells * d * d + 2 * cells * keys * d * 2 * d + 2 * cells * d * d + 2 * 2 * cells * d * hidden
    einsum = 2 * 2 * cells * keys * d
    assert merger == linear + einsum
