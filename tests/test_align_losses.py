"""Preference losses against the definitions TRL's DPOTrainer documents, on random log-probs."""

import pytest
import torch
import torch.nn.functional as F

from quintet.align.losses import preference_loss, preference_metrics


def _logps(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * 50 + 1) for _ in range(4)]


def trl_reference(pc, pr, rc, rr, beta, loss_type, eps):
    """Written from TRL's documented per-loss definitions, term by term."""
    delta = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        return (delta - 1 / (2 * beta)) ** 2
    clean = -(1 - eps) * F.logsigmoid(beta * delta)
    flipped = -eps * F.logsigmoid(-beta * delta)
    return (clean - flipped) / (1 - 2 * eps)


CASES = [
    (loss_type, beta, eps)
    for loss_type in ("sigmoid", "hinge", "ipo", "robust")
    for beta in (0.01, 0.1, 0.5)
    for eps in ((0.0, 0.2) if loss_type in ("sigmoid", "robust") else (0.0,))  # smoothing: those two only
]


@pytest.mark.parametrize("loss_type, beta, eps", CASES)
def test_losses_equal_trl_definitions(loss_type, beta, eps):
    pc, pr, rc, rr = _logps(seed=int(beta * 100) + int(eps * 10))
    ours = preference_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    torch.testing.assert_close(ours, trl_reference(pc, pr, rc, rr, beta, loss_type, eps))


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr = torch.tensor([-5.0], requires_grad=True), torch.tensor([-4.0], requires_grad=True)
    loss = preference_loss(pc, pr, torch.tensor([-5.0]), torch.tensor([-4.0]), beta=0.1).sum()
    loss.backward()
    assert pc.grad.item() < 0 < pr.grad.item()
    assert abs(loss.item() - torch.log(torch.tensor(2.0)).item()) < 1e-6  # h = 0 -> log 2


def test_metrics_use_trl_names_and_values():
    pc, pr, rc, rr = (torch.tensor(v) for v in ([-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0], [-2.0, -2.0]))
    m = preference_metrics(pc, pr, rc, rr, beta=0.5)
    assert m["rewards/chosen"] == pytest.approx(0.25)
    assert m["rewards/rejected"] == pytest.approx(0.0)
    assert m["rewards/accuracies"] == pytest.approx(0.5)
    assert m["rewards/margins"] == pytest.approx(0.25)
    assert m["logps/chosen"] == pytest.approx(-1.5) and m["logps/rejected"] == pytest.approx(-2.0)


def test_bad_arguments():
    t = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type = 'kto'"):
        preference_loss(t, t, t, t, loss_type="kto")
    with pytest.raises(ValueError, match="beta = 0"):
        preference_loss(t, t, t, t, beta=0)
    with pytest.raises(ValueError, match="label_smoothing = 0.5"):
        preference_loss(t, t, t, t, label_smoothing=0.5)
