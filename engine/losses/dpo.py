"""DPO (Rafailov et al. 2023) as a pure function of sequence log-probs.

With h = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)] (sums over completion tokens):

    sigmoid (DPO):      -log sigmoid(beta * h)
    label smoothing eps (cDPO, conservative DPO):
                        -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

The implicit rewards beta * (log pi - log ref) of chosen and rejected are the metrics every
preference method logs: their margin should grow and the accuracy (margin > 0) should rise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair DPO losses [B] and per-pair metrics (each [B], detached)."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    logits = beta * (chosen_ratio - rejected_ratio)
    # logsigmoid, not log(sigmoid(.)): stays finite for large |beta * h|.
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    chosen_rewards = (beta * chosen_ratio).detach()
    rejected_rewards = (beta * rejected_ratio).detach()
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margin": chosen_rewards - rejected_rewards,
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float(),
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    }
    return losses, metrics
