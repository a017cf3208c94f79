"""Reward-model loss (Bradley-Terry) and the Llama 2 helpfulness/safety reward combination.

Pairwise loss (InstructGPT arXiv 2203.02155; Llama 2 arXiv 2307.09288 adds the margin m):

    loss = -log sigmoid(r_c - r_r - m) + eta (r_c + r_r)^2

r_c, r_r are the scalar rewards of chosen and rejected (read at the last non-pad token). Defaults:
m = 0; Llama 2 margins by rating, "small" {1, 2/3, 1/3, 0} or "large" {3, 2, 1, 0};
eta = 0 (0.01 is the usual value when centering is wanted; it keeps rewards near zero mean).

Llama 2 (section 3.2.2) trains separate helpfulness and safety reward models and, for PPO, uses

    R_c = R_s  if the prompt is safety-tagged or R_s < 0.15,  else R_h
    R~  = whiten(logit(R_c))

where the scores R are probabilities in (0, 1) (sigmoid of the reward models' outputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reward_model_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses [B] = -log sigmoid(r_c - r_r - margin) + center_coef (r_c + r_r)^2, and metrics.

    margin: None (0), a float, or a [B] tensor (Llama 2's per-rating margin). center_coef is eta.
    Metrics (each [B], detached): rewards/chosen, rewards/rejected, rewards/margin (r_c - r_r,
    without the target margin), rewards/accuracy (r_c > r_r).
    """
    if center_coef < 0:
        raise ValueError(f"center_coef must be >= 0 (got {center_coef})")
    diff = chosen_rewards - rejected_rewards
    logits = diff if margin is None else diff - margin
    losses = -F.logsigmoid(logits)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    metrics = {
        "rewards/chosen": chosen_rewards.detach(),
        "rewards/rejected": rejected_rewards.detach(),
        "rewards/margin": diff.detach(),
        "rewards/accuracy": (diff > 0).float().detach(),
    }
    return losses, metrics


MAX_MARGIN_BUCKETS = 8  # more distinct margins than this are grouped into quartiles


def reward_eval_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    margins: torch.Tensor | None = None,
) -> dict[str, float]:
    """Whole-split statistics of a reward model on held-out pairs (docs/algorithms.md, rm).

    All inputs are [B] (one entry per pair; lengths in completion tokens incl. EOS). Returns:
    - rewards/accuracy: fraction of pairs with r_c > r_r (a tie counts as wrong);
    - rewards/margin: mean of r_c - r_r;
    - rewards/mean, rewards/std (population), rewards/min, rewards/max: over all 2B scores;
    - rewards/length_corr: Pearson correlation of score and completion length over the 2B scored
      completions (a length bias shows up here; 0 when scores or lengths are constant);
    - rewards/accuracy_margin_<m>: accuracy among the pairs whose target margin is m, to 3 significant
      digits (Llama 2's rating buckets), when `margins` is given; with more than MAX_MARGIN_BUCKETS distinct
      margins, the pairs are grouped by margin quartile instead (`rewards/accuracy_margin_q1`..`q4`,
      q1 the smallest margins).
    """
    chosen, rejected = chosen_rewards.detach().double().cpu(), rejected_rewards.detach().double().cpu()
    if chosen.numel() == 0:
        return {}
    correct = (chosen > rejected).double()
    scores = torch.cat([chosen, rejected])
    lengths = torch.cat([chosen_lengths, rejected_lengths]).double().cpu()
    centred_scores, centred_lengths = scores - scores.mean(), lengths - lengths.mean()
    denominator = (centred_scores.pow(2).sum() * centred_lengths.pow(2).sum()).sqrt()
    corr = (centred_scores * centred_lengths).sum() / denominator if denominator > 0 else torch.tensor(0.0)
    metrics = {
        "rewards/accuracy": correct.mean().item(),
        "rewards/margin": (chosen - rejected).mean().item(),
        "rewards/mean": scores.mean().item(),
        "rewards/std": scores.std(unbiased=False).item(),
        "rewards/min": scores.min().item(),
        "rewards/max": scores.max().item(),
        "rewards/length_corr": corr.item(),
    }
    if margins is not None:
        margins = margins.detach().double().cpu()
        labels = [f"{m:.3g}" for m in margins.tolist()]  # 2/3 -> "0.667"
        if len(set(labels)) <= MAX_MARGIN_BUCKETS:
            for label in sorted(set(labels), key=float):
                in_bucket = torch.tensor([other == label for other in labels])
                metrics[f"rewards/accuracy_margin_{label}"] = correct[in_bucket].mean().item()
        else:
            ranks = margins.argsort(stable=True).argsort(stable=True)  # quartile by rank: equal-sized groups
            quartile = ranks * 4 // margins.numel()
            for q in range(4):
                if (quartile == q).any():
                    metrics[f"rewards/accuracy_margin_q{q + 1}"] = correct[quartile == q].mean().item()
    return metrics


def combine_helpful_safety(
    helpful: torch.Tensor,
    safety: torch.Tensor,
    is_safety_prompt: torch.Tensor,
    safety_threshold: float = 0.15,
) -> torch.Tensor:
    """Llama 2's combined score: safety where the prompt is safety-tagged or safety < threshold, else helpful.

    helpful and safety are PROBABILITIES in [0, 1] (sigmoid of each reward model's output), not
    raw reward-model outputs; is_safety_prompt is a [B] bool. Default threshold 0.15 (Llama 2).
    """
    for name, scores in (("helpful", helpful), ("safety", safety)):
        if scores.numel() and not ((scores >= 0) & (scores <= 1)).all():
            raise ValueError(
                f"{name} scores must be probabilities in [0, 1]; apply sigmoid to reward-model outputs first"
            )
    use_safety = is_safety_prompt.bool() | (safety < safety_threshold)
    return torch.where(use_safety, safety, helpful)


def logit_whiten(scores: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """whiten(logit(clamp(scores, eps, 1 - eps))) over the batch: zero mean, unit (population) std.

    scores are probabilities (e.g. `combine_helpful_safety`'s output). The clamp keeps the logit
    finite at 0 and 1. Whitening divides by sqrt(var + 1e-12) with the population variance, so a
    batch of one, or of identical scores, maps to zeros instead of NaN.
    """
    p = scores.clamp(eps, 1 - eps)
    logits = torch.log(p) - torch.log1p(-p)
    centred = logits - logits.mean()
    return centred * torch.rsqrt(centred.pow(2).mean() + 1e-12)
