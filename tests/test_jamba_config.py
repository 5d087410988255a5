"""JambaConfig: defaults, presets, config.json, and the errors for bad fields."""

import json

import pytest
import transformers

from quintet.models.jamba import PRESETS, ConfigError, JambaConfig


def test_defaults_are_transformers_defaults():
    ours, theirs = JambaConfig(), transformers.JambaConfig()
    for key, value in ours.to_dict().items():
        if key == "architectures":
            continue
        assert getattr(theirs, key) == value, key
    assert ours.layout == "mmmmAmmm" * 4


def test_json_round_trip_and_transformers_reads_ours(tmp_path):
    cfg = JambaConfig.from_preset("jamba-tiny")
    cfg.save_pretrained(tmp_path)
    assert JambaConfig.from_pretrained(tmp_path) == cfg
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "jamba"
    theirs = transformers.JambaConfig.from_pretrained(tmp_path)
    assert theirs.layers_block_type == cfg.layers_block_type
    assert theirs.layers_num_experts == cfg.layers_num_experts


def test_reads_transformers_config_with_alias_and_metadata(tmp_path):
    transformers.JambaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2).save_pretrained(
        tmp_path
    )
    cfg = JambaConfig.from_pretrained(tmp_path)
    assert cfg.hidden_size == 64 and cfg.mamba_dt_rank == 4
    assert JambaConfig.from_dict({"num_local_experts": 4, "num_experts_per_tok": 1}).num_experts == 4


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build(name):
    cfg = JambaConfig.from_preset(name)
    assert len(cfg.layout) == cfg.num_hidden_layers


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (
            dict(attn_layer_offset=8, attn_layer_period=8),
            "attn_layer_offset = 8: must be smaller than attn_layer_period",
        ),
        (dict(expert_layer_offset=3, expert_layer_period=2), "expert_layer_offset = 3"),
        (
            dict(hidden_size=100, num_attention_heads=32),
            "num_attention_heads = 32: must divide hidden_size = 100",
        ),
        (dict(num_attention_heads=32, num_key_value_heads=5), "num_key_value_heads = 5: must divide"),
        (dict(num_experts=2, num_experts_per_tok=3), "num_experts_per_tok = 3"),
        (dict(hidden_act="gelu"), "hidden_act = 'gelu'"),
        (dict(mamba_d_state=0), "mamba_d_state = 0: must be a positive integer"),
        (dict(vocab_size=100, eos_token_id=100), "eos_token_id = 100: must be a token id in [0, 100)"),
    ],
)
def test_invalid_fields_name_field_value_and_valid_range(kwargs, fragment):
    with pytest.raises(
        ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        JambaConfig(**kwargs)


def test_unknown_field_in_config_json_is_an_error_naming_file_and_suggestion(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "jamba", "hiden_size": 64}))
    with pytest.raises(ConfigError) as err:
        JambaConfig.from_json_file(path)
    assert str(path) in str(err.value)
    assert "'hiden_size' (did you mean 'hidden_size'?)" in str(err.value)


def test_bad_json_and_wrong_model_type(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"hidden_size": 64,,}')
    with pytest.raises(ConfigError, match="not valid JSON \\(line 1"):
        JambaConfig.from_json_file(path)
    path.write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type = 'llama': expected 'jamba'"):
        JambaConfig.from_json_file(path)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown Jamba preset 'jamba-huge'; valid presets: jamba-tiny"):
        JambaConfig.from_preset("jamba-huge")
