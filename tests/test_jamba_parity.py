"""Our Jamba against transformers' JambaForCausalLM on the same weights, moved both ways on disk."""

import pytest
import torch
import transformers
from jamba_configs import PARITY_CONFIGS

from quintet.generation import generate
from quintet.models.jamba import JambaConfig, JambaForCausalLM

CASES = sorted(PARITY_CONFIGS)


def _perturb(model: torch.nn.Module) -> None:
    """Move every parameter away from its initial constant (norm weights 1, D 1, zero biases)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def _hf_config(kw: dict) -> transformers.JambaConfig:
    return transformers.JambaConfig(**kw, eos_token_id=None, initializer_range=0.1)


def _theirs_and_ours_from_hf(name: str, tmp_path):
    torch.manual_seed(1)
    theirs = transformers.JambaForCausalLM(_hf_config(PARITY_CONFIGS[name])).eval()
    _perturb(theirs)
    theirs.save_pretrained(tmp_path / "hf")
    ours = JambaForCausalLM.from_pretrained(tmp_path / "hf")
    return theirs, ours


def _theirs_from_ours(name: str, tmp_path):
    torch.manual_seed(2)
    ours = JambaForCausalLM(
        JambaConfig(**PARITY_CONFIGS[name], eos_token_id=None, initializer_range=0.1)
    ).eval()
    _perturb(ours)
    ours.save_pretrained(tmp_path / "ours")
    theirs = transformers.JambaForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    return theirs, ours


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("direction", ["hf_to_ours", "ours_to_hf"])
def test_logits_and_aux_loss_match_transformers(name, direction, tmp_path):
    theirs, ours = (_theirs_and_ours_from_hf if direction == "hf_to_ours" else _theirs_from_ours)(
        name, tmp_path
    )
    vocab = PARITY_CONFIGS[name]["vocab_size"]
    ids = torch.randint(0, vocab, (3, 29))
    labels = torch.randint(0, vocab, (3, 29))
    with torch.no_grad():
        a = ours(ids, labels=labels, output_router_logits=True)
        b = theirs(ids, labels=labels, output_router_logits=True)
    assert a.logits.dtype == torch.float32
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.aux_loss, b.aux_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_32_greedy_tokens_match_transformers(name, tmp_path):
    theirs, ours = _theirs_and_ours_from_hf(name, tmp_path)
    vocab = PARITY_CONFIGS[name]["vocab_size"]
    prompt = torch.randint(3, vocab, (1, 7))
    with torch.no_grad():
        expected = theirs.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0)[0, 7:].tolist()
    got = generate(ours, prompt.tolist(), max_new_tokens=32, stop_token_ids=())[0]
    assert len(expected) == 32
    assert got == expected


@pytest.mark.parametrize("name", CASES)
def test_checkpoint_round_trips_through_transformers(name, tmp_path):
    """ours -> disk -> transformers -> disk -> ours gives back every tensor bit for bit."""
    theirs, ours = _theirs_from_ours(name, tmp_path)
    theirs.save_pretrained(tmp_path / "back")
    again = JambaForCausalLM.from_pretrained(tmp_path / "back")
    original, returned = ours.state_dict(), again.state_dict()
    assert original.keys() == returned.keys()
    for key in original:
        assert torch.equal(original[key], returned[key]), key
    assert again.config == ours.config
