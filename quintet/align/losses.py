"""Preference-optimisation losses as pure functions of policy and reference log-probabilities.

Inputs are per-pair sequence log-probabilities of the chosen and rejected completions, (batch,) each.
With the log-ratio margin  h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l)):

    sigmoid (DPO, Rafailov et al. 2023)   -log sigmoid(beta h)                   (label smoothing e:
                                           -(1-e) log sigmoid(beta h) - e log sigmoid(-beta h), cDPO)
    robust  (Chowdhury et al. 2024)        ((1-e) (-log sigmoid(beta h)) + e log sigmoid(-beta h)) / (1 - 2e)
    hinge   (SLiC, Zhao et al. 2023)       relu(1 - beta h)
    ipo     (Azar et al. 2023)             (h - 1 / (2 beta))^2   (TRL feeds IPO length-averaged log-probs)

These are the definitions TRL's DPOTrainer documents for its `loss_type`s, and the implicit rewards
`beta * (log pi(y) - log ref(y))` are reported under TRL's metric names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair losses, (batch,)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type = {loss_type!r}: valid: {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta = {beta!r}: must be > 0")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing = {label_smoothing!r}: must be in [0, 0.5)")
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    e = label_smoothing
    if loss_type == "sigmoid":
        return -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)
    if loss_type == "robust":
        return ((1 - e) * -F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    return (h - 1 / (2 * beta)) ** 2


def preference_metrics(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> dict[str, float]:
    """TRL's metric names: implicit rewards, their accuracy and margin, and the policy log-probs."""
    chosen = beta * (policy_chosen - ref_chosen).detach()
    rejected = beta * (policy_rejected - ref_rejected).detach()
    return {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "logps/chosen": policy_chosen.detach().mean().item(),
        "logps/rejected": policy_rejected.detach().mean().item(),
        "ref/margin": (ref_chosen - ref_rejected).detach().mean().item(),
    }
