"""What the online methods make of their rewards, as pure functions: advantages (GRPO, Dr. GRPO, RLOO, PPO's
GAE), the KL penalty (estimators, the adaptive coefficient) and which samples to keep (best-of-K, ReST).
The policy and value losses that use them are in engine/losses/online.py.

Shapes: per-token tensors are [B, T] with a completion `mask` [B, T] (1/True on valid completion
tokens incl. the final EOS, 0 on padding); per-sequence tensors are [B]. The rows of one prompt's
group are contiguous: with group size G, rows g*G .. g*G+G-1 share a prompt.

Advantages (r = scalar rewards of a group of G samples of one prompt):

    GRPO      (arXiv 2402.03300)   A_i = (r_i - mean r) / (std r + 1e-4), broadcast over the tokens of o_i
    Dr. GRPO  (arXiv 2503.20783)   A_i = r_i - mean r                    (no std division: difficulty bias)
    Lite-PPO  (Liu et al. 2025, "Tricks or Traps?")  group mean, std over the whole batch
    RLOO      (arXiv 2402.14740)   A_i = r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean r)
    PPO       GAE (arXiv 1506.02438) on per-token rewards r_t = -beta k1_t, plus the score at the last token

KL estimators (Schulman 2020, "Approximating KL divergence"), l = log pi_theta - log pi_ref per token:
k1 = l, k2 = l^2 / 2, k3 = exp(-l) - 1 + l. See `token_kl` for which gradient each one gives.

Also here: the adaptive KL coefficient (Ziegler et al. 2019, arXiv 1909.08593), best-of-K selection
and its analytic KL (Llama 2 arXiv 2307.09288; RAFT arXiv 2304.06767), ReST Improve thresholds
(arXiv 2308.08998).
"""

from __future__ import annotations

import math

import torch

ADVANTAGE_SCALES = ("group", "batch", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")


# ---------------------------------------------------------------- helpers


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """Integer or bool rewards / lengths become the default float dtype; float tensors are kept as they are."""
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] -> [B // G, G], checking that B is a whole number of groups."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B] (got shape {tuple(rewards.shape)})")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1 (got {group_size})")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"batch size {rewards.numel()} is not a multiple of group_size {group_size}")
    return _as_float(rewards).reshape(-1, group_size)


# ---------------------------------------------------------------- group advantages (GRPO, RLOO)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages [B]: rewards centred on their group mean, optionally divided by a std.

        A_i = (r_i - mean_group r) / (std + eps)

    scale:
    - "group": std within each group (GRPO, arXiv 2402.03300; TRL scale_rewards="group").
    - "batch": std of all B rewards of the batch (Lite-PPO: group mean, batch std; TRL "batch").
    - "none":  no division, A_i = r_i - mean_group r (Dr. GRPO, arXiv 2503.20783, which shows the
               group-std division up-weights too-easy and too-hard questions).

    std is the UNBIASED sample std (correction=1, as torch.std / TRL). A group whose rewards are
    all equal gets A = 0 (no learning signal); a group of size 1 always has A = 0.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale '{scale}'; expected one of {', '.join(ADVANTAGE_SCALES)}")
    grouped = _grouped(rewards, group_size)
    if group_size == 1:  # std of one sample is undefined (nan); the centred reward is 0 anyway
        return torch.zeros_like(grouped).view(-1)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (grouped.std() + eps)
    return centred.view(-1)


def group_stats(rewards: torch.Tensor, group_size: int) -> dict[str, float]:
    """Per-group reward statistics, averaged over the groups of the batch (python floats).

    - frac_reward_zero_std: fraction of groups whose rewards are all equal (zero advantage, no signal).
    - reward/group_std_mean: mean of the within-group UNBIASED std (0 for groups of size 1).
    - reward/group_max_mean, reward/group_median_mean: mean over groups of the max / the median.
    - reward/max_median_gap: mean over groups of (max - median), the best-of-K headroom (Llama 2).

    The median is torch.median's: for an even group size it is the LOWER of the two middle values
    (e.g. median of [1, 2, 3, 4] is 2), not their average.
    """
    grouped = _grouped(rewards, group_size)
    max_r = grouped.max(dim=1).values
    median_r = grouped.median(dim=1).values
    all_equal = grouped.max(dim=1).values == grouped.min(dim=1).values
    std = grouped.std(dim=1) if group_size > 1 else torch.zeros_like(max_r)
    return {
        "frac_reward_zero_std": float(all_equal.to(grouped.dtype).mean()),
        "reward/group_std_mean": float(std.mean()),
        "reward/group_max_mean": float(max_r.mean()),
        "reward/group_median_mean": float(median_r.mean()),
        "reward/max_median_gap": float((max_r - median_r).mean()),
    }


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO leave-one-out advantages [B] (Ahmadian et al. 2024, arXiv 2402.14740).

        A_i = R_i - (1 / (k - 1)) sum_{j != i} R_j  =  k / (k - 1) (R_i - mean R),   k = group_size

    R already includes the KL penalty (R = score - beta sum_t k1_t, see docs/algorithms.md, ppo).
    The baseline of sample i never uses R_i, so the estimator is unbiased. Needs k >= 2.
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs group_size >= 2 (got {group_size})")
    grouped = _grouped(rewards, group_size)
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others_mean).view(-1)


# ---------------------------------------------------------------- KL estimators


def token_kl(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate (same shape as the inputs), l = logps - ref_logps, tokens sampled from pi_theta:

        k1 = l                   unbiased for KL(pi_theta || pi_ref), can be negative
        k2 = l^2 / 2             biased, >= 0
        k3 = exp(-l) - 1 + l     unbiased, >= 0, low variance

    Gradient trap (docs/algorithms.md, Shared conventions): as values all three estimate the reverse KL, but used
    as an on-policy LOSS (differentiated through logps, samples held fixed):
    - E[grad k1] = 0: k1 in the loss does nothing in expectation. Put k1 in the REWARD (PPO, RLOO).
    - grad E[k2] is the gradient of the reverse KL(pi_theta || pi_ref).
    - E[grad k3] is the gradient of the FORWARD KL(pi_ref || pi_theta), so GRPO's k3-in-loss is an
      approximation of the intended penalty.
    Log k1 and k3 side by side. Padding is not masked here: multiply by the mask (or aggregate).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator '{estimator}'; expected one of {', '.join(KL_ESTIMATORS)}")
    log_ratio = logps - ref_logps
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    return torch.exp(-log_ratio) - 1 + log_ratio


# ---------------------------------------------------------------- PPO: per-token rewards, GAE, whitening


def ppo_token_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO-RLHF rewards (InstructGPT arXiv 2203.02155; Ziegler et al. arXiv 1909.08593).

        k1_t = logps_t - ref_logps_t
        r_t  = -kl_coef k1_t  (+ score of the sequence at its LAST valid token)

    Returns (token_rewards [B, T], token_kl_k1 [B, T]), both zero on padding and detached (rewards
    carry no gradient). The last valid token is found per row, so rows may be right-padded to
    different lengths; a row with no valid token gets no score. Log the sequence KL sum_t k1_t:
    per-token k1 can be negative.
    """
    valid = mask.bool()
    kl = torch.where(valid, (logps - ref_logps).detach(), torch.zeros_like(logps))
    positions = torch.arange(logps.shape[-1], device=logps.device).expand_as(valid)
    last_position = torch.where(valid, positions, torch.full_like(positions, -1)).max(dim=-1, keepdim=True).values
    is_last = valid & (positions == last_position)
    token_rewards = -kl_coef * kl + is_last.to(kl.dtype) * scores.detach().to(kl.dtype).unsqueeze(-1)
    return token_rewards, kl


def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2015, arXiv 1506.02438) -> (advantages, returns), [B, T].

        delta_t = r_t + gamma V_{t+1} - V_t          (V past the last valid token = 0)
        A_t     = sum_{l >= 0} (gamma lam)^l delta_{t+l}
        G_t     = A_t + V_t                           (the value-function targets)

    Assumes RIGHT padding: each row's valid tokens are a prefix, so the episode ends at the last
    valid token and everything after it is ignored (values and rewards on padding are never read).
    Both outputs are zero on padding and carry no gradient. gamma = lam = 1 gives A_t = reward-to-go - V_t.
    Whiten the advantages over valid tokens afterwards (`whiten`), as PPO-RLHF does.
    """
    valid = mask.bool()
    token_rewards = torch.where(valid, token_rewards.detach(), torch.zeros_like(token_rewards))
    values = torch.where(valid, values.detach(), torch.zeros_like(values))
    weights = valid.to(values.dtype)
    seq_len = values.shape[-1]
    running = torch.zeros_like(values[:, 0])
    advantages_reversed = []
    for t in reversed(range(seq_len)):
        next_values = values[:, t + 1] if t + 1 < seq_len else torch.zeros_like(running)  # 0 on padding
        delta = token_rewards[:, t] + gamma * next_values - values[:, t]
        # zeroing on padding makes the first valid step from the end start a fresh sum
        running = (delta + gamma * lam * running) * weights[:, t]
        advantages_reversed.append(running)
    advantages = torch.stack(advantages_reversed[::-1], dim=-1)
    returns = (advantages + values) * weights
    return advantages, returns


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Masked whitening over the valid entries (PPO advantages; optional reward whitening).

        mu = masked mean,  var = masked UNBIASED variance (n - 1 denominator, as TRL's masked_var)
        shift_mean=True:   (x - mu) / sqrt(var + eps)          mean 0, std 1
        shift_mean=False:  (x - mu) / sqrt(var + eps) + mu     keeps the mean, only rescales the spread

    Returns zero on masked entries. Needs at least 2 valid entries (ValueError otherwise): the
    variance of a single value is undefined and dividing by sqrt(eps) would blow it up.
    """
    valid = mask.bool()
    count = int(valid.sum())
    if count < 2:
        raise ValueError(f"whiten needs at least 2 valid entries (got {count})")
    selected = values[valid]
    mean = selected.mean()
    var = selected.var(correction=1)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(valid, whitened, torch.zeros_like(whitened))


# ---------------------------------------------------------------- the adaptive KL coefficient


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, arXiv 1909.08593, section 2.2).

        e     = clip(current_kl / target - 1, -0.2, 0.2)
        beta <- beta (1 + e n_steps / horizon)

    The coefficient rises when the measured KL is above the target and falls below it, by at most
    20% * n_steps / horizon per update. target None = fixed coefficient (update is a no-op).
    Old TRL (IMDb): init 0.2, target 6, horizon 10000. `state_dict` / `load_state_dict` carry the
    current coefficient so a resumed run continues from it (target and horizon come from the config).
    """

    def __init__(self, init_kl_coef: float, target: float | None, horizon: int):
        if target is not None and not target > 0:
            raise ValueError(f"KL target must be > 0 or None (got {target})")
        if target is not None and not horizon > 0:
            raise ValueError(f"KL horizon must be > 0 (got {horizon})")
        self.value = float(init_kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move the coefficient towards the target after n_steps samples (or steps) at KL current_kl; return it."""
        if self.target is None:
            return self.value
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


# ---------------------------------------------------------------- best-of-K, ReST


def best_of_k_indices(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Index into the flat batch of the best row of each group, [B // group_size] (int64).

    Rejection-sampling fine-tuning (Llama 2 arXiv 2307.09288; RAFT arXiv 2304.06767) keeps
    y* = argmax_i R(x, y_i) per prompt. Ties go to the FIRST maximal row of the group.
    """
    grouped = _grouped(rewards, group_size)
    is_max = grouped == grouped.max(dim=1, keepdim=True).values
    positions = torch.arange(group_size, device=grouped.device).expand_as(is_max)
    first_max = torch.where(is_max, positions, torch.full_like(positions, group_size)).min(dim=1).values
    group_starts = torch.arange(grouped.shape[0], device=grouped.device) * group_size
    return group_starts + first_max


def bon_kl(k: int) -> float:
    """Analytic KL(best-of-K || base) = log K - (K - 1) / K, in nats, for plotting BoN on reward-vs-KL.

    This is the standard formula (Stiennon et al. 2020, arXiv 2009.01325); Beirami et al. 2024
    (arXiv 2401.01879) show it is an upper bound, tight when the K samples are almost surely distinct.
    bon_kl(1) = 0.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k})")
    return math.log(k) - (k - 1) / k


def quantile_threshold(rewards: torch.Tensor, keep_fraction: float) -> float:
    """ReST Improve threshold tau that keeps the top `keep_fraction` of the rewards (arXiv 2308.08998).

    With an uncalibrated reward ReST uses quantiles (top 50% -> 30% -> 10% over Improve steps).
    Definition: with n rewards and k = ceil(keep_fraction * n) (at least 1), tau is the k-th
    LARGEST reward. `rest_keep_mask(rewards, tau)` (R >= tau) then keeps exactly k samples when
    rewards are distinct, and more when other rewards tie with tau. keep_fraction must be in (0, 1].
    E.g. rewards 1..10, keep_fraction 0.3: k = 3, tau = 8, keeps {8, 9, 10}.
    """
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1] (got {keep_fraction})")
    flat = _as_float(rewards.detach()).flatten()
    if flat.numel() == 0:
        raise ValueError("quantile_threshold needs at least one reward")
    # round() first so that float noise such as 0.7 * 10 = 7.000000000000001 does not add a sample
    k = max(1, math.ceil(round(keep_fraction * flat.numel(), 9)))
    return float(torch.sort(flat, descending=True).values[k - 1])


def rest_keep_mask(rewards: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask of the samples ReST Improve trains on: R >= threshold (same shape as rewards)."""
    return rewards >= threshold
