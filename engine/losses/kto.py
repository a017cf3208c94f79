"""KTO (Ethayarajh et al. 2024, arXiv 2402.01306) as a pure function of sequence log-probs.

KTO trains on unpaired examples {prompt, completion, desirable: bool}. With the implied reward
r = log pi(y|x) - log ref(y|x) (sums over completion tokens) and the reference point

    z0 = max(0, mean_j [log pi(y'_j|x_j) - log ref(y'_j|x_j)])      (detached)

where y'_j is a MISMATCHED completion for prompt x_j (the caller pairs each prompt with another
example's completion from the same batch, e.g. rolled by one), the per-example loss is

    desirable:    lambda_D (1 - sigmoid(beta (r - z0)))
    undesirable:  lambda_U (1 - sigmoid(beta (z0 - r)))

Defaults (paper / common practice): beta 0.1 (0.01-0.1 after SFT, 0.1-1 without),
lambda_D = lambda_U = 1 with lambda_D n_D / (lambda_U n_U) in [1, 4/3] (paper: up to 3/2),
lr 5e-6 (paper), per-device batch > 1 (with batch 1, z0 is the example's own reward).
"""

from __future__ import annotations

import torch

KTO_RATIO_BAND = (1.0, 4.0 / 3.0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    kl_policy_logps: torch.Tensor,
    kl_ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example KTO losses [B] and per-example metrics (each [B], detached).

    policy_logps, ref_logps: [B] summed log-probs of each example's own completion.
    kl_policy_logps, kl_ref_logps: [K] summed log-probs of mismatched prompt/completion pairs
    (built by the caller from the same batch); z0 = clamp(mean(kl_policy - kl_ref), min=0), detached.
    desirable: [B] bool.

    loss = lambda_D sigmoid(beta (z0 - r)) on desirable rows and lambda_U sigmoid(beta (r - z0))
    on undesirable rows, i.e. lambda (1 - sigmoid(+-beta (r - z0))) written without the cancellation.

    Metrics, all summable over a batch (no NaN for a batch missing one class):
    kl (z0 on every row), rewards/desirable_sum and rewards/undesirable_sum (beta r on rows of that
    class, else 0), logps/desirable_sum and logps/undesirable_sum (policy_logps likewise),
    count/desirable and count/undesirable (1.0 / 0.0), logps/policy. The mean chosen reward of a
    batch is sum(rewards/desirable_sum) / sum(count/desirable) when the count is > 0.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (got {beta})")
    if kl_policy_logps.numel() == 0:
        raise ValueError("kto_loss needs at least one mismatched pair to estimate z0")
    desirable = desirable.bool()
    rewards = policy_logps - ref_logps
    z0 = (kl_policy_logps - kl_ref_logps).mean().clamp(min=0).detach().to(rewards.dtype)
    margin = beta * (rewards - z0)
    # 1 - sigmoid(x) == sigmoid(-x), which keeps full precision when sigmoid(x) is close to 1.
    losses = torch.where(
        desirable,
        desirable_weight * torch.sigmoid(-margin),
        undesirable_weight * torch.sigmoid(margin),
    )
    beta_rewards = (beta * rewards).detach()
    logps = policy_logps.detach()
    zero = torch.zeros_like(beta_rewards)
    count = desirable.to(beta_rewards.dtype)
    metrics = {
        "kl": z0.expand_as(beta_rewards).clone(),
        "rewards/desirable_sum": torch.where(desirable, beta_rewards, zero),
        "rewards/undesirable_sum": torch.where(desirable, zero, beta_rewards),
        "logps/desirable_sum": torch.where(desirable, logps, zero),
        "logps/undesirable_sum": torch.where(desirable, zero, logps),
        "count/desirable": count,
        "count/undesirable": 1 - count,
        "logps/policy": logps,
    }
    return losses, metrics


def kto_weight_ratio_warning(
    n_desirable: int,
    n_undesirable: int,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> str | None:
    """A warning when lambda_D n_D / (lambda_U n_U) is outside [1, 4/3], else None.

    [1, 4/3] is the recommended band (the KTO paper allows up to 3/2). The message gives the
    ratio and the weight that would bring it to the middle of the band (7/6), either way round.
    """
    if n_desirable < 0 or n_undesirable < 0:
        raise ValueError(f"example counts must be >= 0 (got {n_desirable}, {n_undesirable})")
    if not (desirable_weight > 0 and undesirable_weight > 0):
        raise ValueError(f"KTO weights must be > 0 (got {desirable_weight}, {undesirable_weight})")
    if n_desirable == 0 or n_undesirable == 0:
        missing = "desirable" if n_desirable == 0 else "undesirable"
        if n_desirable == n_undesirable:
            return "KTO: the dataset has no examples"
        return (
            f"KTO: the dataset has no {missing} examples ({n_desirable} desirable, {n_undesirable} undesirable); "
            "desirable_weight/undesirable_weight cannot balance the classes"
        )
    low, high = KTO_RATIO_BAND
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if low * (1 - 1e-12) <= ratio <= high * (1 + 1e-12):
        return None
    target = (low + high) / 2
    new_desirable = target * undesirable_weight * n_undesirable / n_desirable
    new_undesirable = desirable_weight * n_desirable / (target * n_undesirable)
    return (
        f"KTO: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = "
        f"{desirable_weight:g} * {n_desirable} / ({undesirable_weight:g} * {n_undesirable}) = {ratio:.3g}, "
        f"outside the recommended [1, 4/3] (the paper allows up to 3/2); "
        f"set desirable_weight to {new_desirable:.3g} (keeping undesirable_weight {undesirable_weight:g}) "
        f"or undesirable_weight to {new_undesirable:.3g} (keeping desirable_weight {desirable_weight:g})"
    )
