"""The engine's weights moved into one huge-page arena: the same values and outputs, sharing kept."""

import pytest
import torch

from quintet.deploy.huge_pages import huge_pages_available, move_to_huge_pages
from quintet.deploy.quantize import QuantConfig, quantize
from quintet.models.jamba import JambaConfig, JambaForCausalLM


def _model() -> JambaForCausalLM:
    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig.from_preset("jamba-tiny")).eval()
    quantize(model, QuantConfig(group_size=32))
    return model


@pytest.mark.skipif(not huge_pages_available(), reason="no transparent huge pages (Linux, on or madvise)")
def test_moved_weights_give_the_same_logits_in_one_arena():
    model = _model()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.inference_mode():
        before = model(ids).logits
    tensors = {name: t.clone() for name, t in model.state_dict().items()}
    moved = move_to_huge_pages(model, min_bytes=4096)
    assert moved > 0
    after_state = model.state_dict()
    for name, t in tensors.items():
        assert torch.equal(after_state[name], t), name  # the same values
    big = [t for t in after_state.values() if t.nbytes >= 4096]
    storages = {t.untyped_storage().data_ptr() for t in big}
    assert len(storages) == 1  # one arena
    assert min(t.data_ptr() for t in big) % (2 << 20) == 0  # the first tensor starts on a huge page
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, before)


@pytest.mark.skipif(not huge_pages_available(), reason="no transparent huge pages (Linux, on or madvise)")
def test_a_shared_tensor_stays_shared():
    a, b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    b.weight = a.weight
    pair = torch.nn.ModuleList([a, b])
    x = torch.randn(2, 64)
    want = b(a(x))
    assert move_to_huge_pages(pair, min_bytes=1024) == a.weight.nbytes
    assert a.weight is b.weight and isinstance(a.weight, torch.nn.Parameter)
    torch.testing.assert_close(b(a(x)), want, rtol=0, atol=0)


def test_nothing_moves_without_huge_pages(monkeypatch):
    from quintet.deploy import huge_pages

    monkeypatch.setattr(huge_pages, "huge_pages_available", lambda: False)
    model = _model()
    ptrs = [t.data_ptr() for t in model.state_dict().values()]
    assert move_to_huge_pages(model) == 0
    assert [t.data_ptr() for t in model.state_dict().values()] == ptrs
