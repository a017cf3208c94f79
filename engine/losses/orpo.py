"""ORPO (Hong, Lee, Thorne 2024, arXiv 2403.07691): SFT plus an odds-ratio penalty, no reference model.

With m = mean_t log pi(y_t | x, y_<t) (per-token MEAN log-prob) and P = exp(m),

    log odds(m) = log P - log(1 - P) = m - log1mexp(m),  log1mexp(m) = log(1 - exp(m))
    L_OR        = -log sigmoid(log odds(y_w) - log odds(y_l))
    L           = -m(y_w) + lambda * L_OR          (token-mean NLL on chosen + weighted odds-ratio term)

log1mexp uses log(-expm1(m)) for m > -log 2 and log1p(-exp(m)) otherwise (Maechler 2012), in
fp32 at least, so P close to 1 does not blow up log(1 - P). Defaults (paper): lambda 0.1
(Mistral), 0.2 (Llama-2-7B), 0.25 (Phi-2); lr about 5e-6; trained from the base model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x."""
    near_zero = x > -math.log(2)
    # Each branch sees only inputs it is accurate on, so the unused branch cannot put inf or NaN
    # into the gradient through torch.where.
    safe = torch.full_like(x, -1.0)
    near = torch.log(-torch.expm1(torch.where(near_zero, x, safe)))
    far = torch.log1p(-torch.exp(torch.where(near_zero, safe, x)))
    return torch.where(near_zero, near, far)


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log(P / (1 - P)) with P = exp(mean_logps), in fp32 at least.

    mean_logps is capped at -sqrt(tiny) of its dtype (about -1e-19 in fp32), so a sequence the model
    predicts with certainty (m = 0) gives a large finite log-odds instead of inf; past the cap the
    log-odds term has no gradient (the NLL term still does).
    """
    if mean_logps.dtype not in (torch.float32, torch.float64):
        mean_logps = mean_logps.float()
    m = mean_logps.clamp(max=-math.sqrt(torch.finfo(mean_logps.dtype).tiny))
    return m - log1mexp(m)


def orpo_loss(
    chosen_mean_logps: torch.Tensor,
    rejected_mean_logps: torch.Tensor,
    lambda_: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair ORPO losses [B] = -chosen_mean_logps + lambda_ * L_OR, and per-pair metrics.

    Inputs are per-token MEAN log-probs of the policy (not sums). Computed in fp32 (fp64 stays fp64).
    Metrics (each [B], detached): nll_loss (-chosen mean), or_loss (L_OR), log_odds_ratio
    (log odds chosen - log odds rejected), log_odds_chosen, log_odds_rejected,
    rewards/chosen = lambda_ * chosen mean, rewards/rejected = lambda_ * rejected mean,
    rewards/margin, rewards/accuracy (margin > 0), logps/chosen and logps/rejected (the means given).
    """
    if not lambda_ >= 0:
        raise ValueError(f"ORPO lambda must be >= 0 (got {lambda_})")
    chosen_odds = log_odds(chosen_mean_logps)
    rejected_odds = log_odds(rejected_mean_logps)
    ratio = chosen_odds - rejected_odds
    or_loss = -F.logsigmoid(ratio)
    nll = -chosen_mean_logps.to(ratio.dtype)
    losses = nll + lambda_ * or_loss
    chosen_rewards = (lambda_ * chosen_mean_logps).detach()
    rejected_rewards = (lambda_ * rejected_mean_logps).detach()
    metrics = {
        "nll_loss": nll.detach(),
        "or_loss": or_loss.detach(),
        "log_odds_ratio": ratio.detach(),
        "log_odds_chosen": chosen_odds.detach(),
        "log_odds_rejected": rejected_odds.detach(),
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margin": chosen_rewards - rejected_rewards,
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float(),
        "logps/chosen": chosen_mean_logps.detach(),
        "logps/rejected": rejected_mean_logps.detach(),
    }
    return losses, metrics
