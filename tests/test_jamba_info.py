"""Sizes computed from the config equal those of built models."""

import pytest
import torch
from jamba_configs import PARITY_CONFIGS

from quintet.models.jamba import JambaConfig, JambaForCausalLM
from quintet.models.jamba.info import cache_bytes, parameter_counts

CONFIGS = {
    **{k: JambaConfig(**v) for k, v in PARITY_CONFIGS.items()},
    "tiny": JambaConfig.from_preset("jamba-tiny"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_formula_equals_built_model(name):
    cfg = CONFIGS[name]
    with torch.device("meta"):
        model = JambaForCausalLM(cfg)
    counts = parameter_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    moe_layers = sum(e > 1 for e in cfg.layers_num_experts)
    expert = 3 * cfg.hidden_size * cfg.intermediate_size
    assert (
        counts["total"] - counts["active"]
        == moe_layers * (cfg.num_experts - cfg.num_experts_per_tok) * expert
    )


def test_cache_formula_equals_a_real_cache():
    cfg = CONFIGS["alternating"]
    model = JambaForCausalLM(cfg).eval()
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (2, 13)), cache=cache)
    expected = cache_bytes(cfg, 13, dtype="float32", batch_size=2)
    assert cache.nbytes() == {"kv": expected["kv"], "mamba": expected["mamba"]}


def test_bad_dtype_and_length():
    with pytest.raises(ValueError, match="dtype = 'int8': expected one of float32, bfloat16, float16"):
        cache_bytes(CONFIGS["tiny"], 10, dtype="int8")
    with pytest.raises(ValueError, match="context_length = -1"):
        cache_bytes(CONFIGS["tiny"], -1)
