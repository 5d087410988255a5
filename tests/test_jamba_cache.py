"""The hybrid cache: cached decode, chunked prefill and left-padded batches equal full recomputation."""

import pytest
import torch
from jamba_configs import PARITY_CONFIGS

from quintet.generation import generate
from quintet.models.jamba import HybridCache, JambaConfig, JambaForCausalLM


def _model(name: str) -> JambaForCausalLM:
    model = JambaForCausalLM(JambaConfig(**PARITY_CONFIGS[name], initializer_range=0.1)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_cached_decode_equals_full_recompute(name):
    model = _model(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        steps = [model(ids[:, :12], cache=cache).logits]
        steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 20


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_chunked_prefill_equals_one_shot(name):
    model = _model(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 23))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        chunks = [model(ids[:, s : s + 5], cache=cache).logits for s in range(0, 23, 5)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


def test_mamba_state_is_constant_in_length_and_kv_grows():
    model = _model("alternating")
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 10)), cache=cache)
        first = cache.nbytes()
        model(torch.randint(0, 97, (1, 30)), cache=cache)
        second = cache.nbytes()
    assert second["mamba"] == first["mamba"] > 0
    assert second["kv"] == 4 * first["kv"]
    n_attn = model.config.layers_block_type.count("attention")
    assert sum(k is not None for k in cache.keys) == n_attn
    assert sum(s is not None for s in cache.ssm_states) == model.config.num_hidden_layers - n_attn
    assert all(s.dtype == torch.float32 for s in cache.ssm_states if s is not None)


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_left_padded_batch_equals_prompts_one_at_a_time(name):
    model = _model(name)
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (n,)).tolist() for n in (9, 3, 14, 1)]
    alone = [generate(model, [p], max_new_tokens=16, stop_token_ids=())[0] for p in prompts]
    batched = generate(model, prompts, max_new_tokens=16, stop_token_ids=())
    assert batched == alone
    sampled_alone = [
        generate(model, [p], max_new_tokens=12, do_sample=True, seed=7 + i, top_k=20, top_p=0.9)[0]
        for i, p in enumerate(prompts)
    ]
    sampled = generate(model, prompts, max_new_tokens=12, do_sample=True, seed=7, top_k=20, top_p=0.9)
    assert sampled == sampled_alone


def test_padded_prefill_logits_equal_unpadded():
    model = _model("period3_mqa")  # has in/out projection biases: padding must still be inert
    ids = torch.randint(3, 120, (1, 11))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 11, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = model(ids).logits
        batched = model(padded, attention_mask=mask).logits[:, 5:]
    assert torch.isfinite(model(padded, attention_mask=mask).logits).all()
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_cache_is_a_hybrid_cache():
    assert isinstance(_model("alternating").new_cache(), HybridCache)
