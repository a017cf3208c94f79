"""DPO (Rafailov et al. 2023) and its offline variants as pure functions of sequence log-probs.

Every function returns (per-pair losses [B], metrics) where metrics is a dict of per-pair,
detached [B] tensors; the caller sums or averages them over the batch.

With the log-ratio margin

    h = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)]

`dpo_loss(..., loss_type=...)` computes, with eps = label_smoothing:

    "sigmoid"  DPO, arXiv 2305.18290:      -log sigmoid(beta h)
               cDPO (eps > 0):             -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    "robust"   Chowdhury et al. 2024, arXiv 2403.00409 (unbiased under label-flip rate eps < 0.5):
               [-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps)
    "hinge"    SLiC / RSO, arXiv 2309.06657:  max(0, 1 - beta h)
    "ipo"      Azar et al. 2023, arXiv 2310.12036:  (h - 1 / (2 beta))^2, beta playing tau

Sums over completion tokens are the inputs for sigmoid, robust and hinge. For "ipo" the caller
passes per-token MEAN log-probs (policy and reference), so h is a per-token log-ratio and the
target margin 1/(2 tau) is in per-token nats.

Defaults (paper): beta 0.1 (0.5 on TL;DR); cDPO eps about 0.1; robust eps 0.1; RSO hinge beta 0.05;
IPO tau needs a sweep. `simpo_loss` (SimPO, arXiv 2405.14734) and `rpo_loss` (RPO, arXiv
2404.19733) are below.

The implicit rewards beta * (log pi - log ref) of chosen and rejected are the metrics every
preference method logs: their margin should grow and the accuracy (margin > 0) should rise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (got {beta})")


def _check_label_smoothing(label_smoothing: float, loss_type: str) -> None:
    if loss_type in ("sigmoid", "robust"):
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5) for loss_type '{loss_type}' (got {label_smoothing})")
    elif label_smoothing != 0:
        raise ValueError(
            f"label_smoothing applies to loss_type 'sigmoid' (cDPO) and 'robust' only; "
            f"got {label_smoothing} with '{loss_type}' (set it to 0)"
        )


def _smoothed_logsigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z); logsigmoid keeps it finite for any |z|."""
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses


def _preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
) -> dict[str, torch.Tensor]:
    chosen_rewards = chosen_rewards.detach()
    rejected_rewards = rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margin": chosen_rewards - rejected_rewards,
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float(),
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    }


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    *,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair DPO-family losses [B] and per-pair metrics (each [B], detached).

    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps), eps = label_smoothing:

    - "sigmoid" (DPO; cDPO when eps > 0): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    - "robust" (Chowdhury et al. 2024): [-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps)
    - "hinge" (SLiC / RSO): relu(1 - beta h)
    - "ipo" (Azar et al. 2023): (h - 1 / (2 beta))^2. Pass per-token MEAN log-probs for all four
      inputs (not sums); beta is IPO's tau.

    eps must be in [0, 0.5) for "sigmoid" and "robust" and 0 for the others. Metrics:
    rewards/chosen = beta (chosen_logps - ref_chosen_logps), rewards/rejected likewise,
    rewards/margin, rewards/accuracy (margin > 0), logps/chosen, logps/rejected (the inputs given).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type '{loss_type}'; expected one of {', '.join(DPO_LOSS_TYPES)}")
    _check_beta(beta)
    _check_label_smoothing(label_smoothing, loss_type)
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    logits = beta * h
    if loss_type == "sigmoid":
        losses = _smoothed_logsigmoid_loss(logits, label_smoothing)
    elif loss_type == "robust":
        eps = label_smoothing
        losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - logits)
    else:  # ipo
        losses = (h - 1 / (2 * beta)) ** 2
    metrics = _preference_metrics(beta * chosen_ratio, beta * rejected_ratio, chosen_logps, rejected_logps)
    return losses, metrics


def simpo_loss(
    chosen_mean_logps: torch.Tensor,
    rejected_mean_logps: torch.Tensor,
    beta: float,
    gamma_beta_ratio: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO (Meng, Xia, Chen 2024, arXiv 2405.14734): reference-free, length-normalised DPO.

    With c = chosen_mean_logps, r = rejected_mean_logps (per-token MEAN log-probs of the policy)
    and gamma = gamma_beta_ratio * beta, z = beta c - beta r - gamma and

        loss = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)      (eps = label_smoothing, default 0)

    Defaults (paper): beta 2-2.5 (up to 10), gamma/beta 0.5 (grid 0-1), lr 3e-7 to 1e-6.
    Metrics: rewards/chosen = beta c, rewards/rejected = beta r, rewards/margin, rewards/accuracy
    (margin > 0, without gamma), logps/chosen = c and logps/rejected = r (the means given).
    """
    _check_beta(beta)
    _check_label_smoothing(label_smoothing, "sigmoid")
    chosen_rewards = beta * chosen_mean_logps
    rejected_rewards = beta * rejected_mean_logps
    gamma = gamma_beta_ratio * beta
    losses = _smoothed_logsigmoid_loss(chosen_rewards - rejected_rewards - gamma, label_smoothing)
    metrics = _preference_metrics(chosen_rewards, rejected_rewards, chosen_mean_logps, rejected_mean_logps)
    return losses, metrics


def cpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_token_counts: torch.Tensor,
    beta: float,
    alpha: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CPO (Xu et al. 2024, arXiv 2401.08417): DPO's preference term with no reference model, plus
    behaviour cloning on the chosen answer.

        loss = -log sigmoid(beta * chosen_logps - beta * rejected_logps) + alpha * (-chosen_logps / |y_w|)

    chosen_logps and rejected_logps are SUMS over completion tokens (the paper's log pi(y|x)); the
    NLL term is the chosen answer's per-token mean (counts below 1 count as 1), so its weight does
    not grow with length. The paper: beta 0.1, alpha 1.
    Metrics: rewards/chosen = beta chosen_logps, rewards/rejected = beta rejected_logps,
    rewards/margin, rewards/accuracy, logps/chosen, logps/rejected (sums), nll_loss (per pair).
    """
    _check_beta(beta)
    chosen_rewards = beta * chosen_logps
    rejected_rewards = beta * rejected_logps
    nll = -chosen_logps / chosen_token_counts.clamp(min=1).to(chosen_logps.dtype)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards) + alpha * nll
    metrics = _preference_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)
    metrics["nll_loss"] = nll.detach()
    return losses, metrics


def rpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_token_counts: torch.Tensor,
    beta: float,
    alpha: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RPO (Pang et al. 2024, arXiv 2404.19733): a DPO-family loss plus a length-normalised NLL on chosen.

        loss = dpo_loss(..., loss_type) + alpha * (-chosen_logps / |y_w|)

    chosen_logps etc. are SUMS over completion tokens and chosen_token_counts is |y_w| (counts
    below 1 are treated as 1). Default alpha = 1 (paper: the NLL term is crucial for reasoning).
    loss_type "ipo" is refused: its preference term wants per-token means while the NLL term here
    needs sums; build that combination from `dpo_loss` directly.
    Metrics: those of `dpo_loss` plus nll_loss = -chosen_logps / |y_w| (per pair, detached).
    """
    if loss_type == "ipo":
        raise ValueError(
            "rpo_loss takes summed log-probs but IPO needs per-token means; "
            "combine dpo_loss(loss_type='ipo') with an NLL term instead"
        )
    losses, metrics = dpo_loss(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, label_smoothing, loss_type=loss_type
    )
    nll = -chosen_logps / chosen_token_counts.clamp(min=1).to(chosen_logps.dtype)
    metrics["nll_loss"] = nll.detach()
    return losses + alpha * nll, metrics
