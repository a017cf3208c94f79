"""Online RL losses as pure functions: the clipped policy losses (PPO, GRPO / Dr. GRPO / DAPO, GSPO, CISPO),
RLOO's sequence-level loss, the token aggregations, and PPO's clipped value loss. The advantages, KL estimators
and sample selection they are fed are in engine/losses/advantages.py.

Shapes: per-token tensors are [B, T] with a completion `mask` [B, T] (1/True on valid completion
tokens incl. the final EOS, 0 on padding); per-sequence tensors are [B]. The rows of one prompt's
group are contiguous: with group size G, rows g*G .. g*G+G-1 share a prompt.

Loss functions return per-token (or per-sequence) losses that the caller reduces with
`aggregate_token_loss`, which returns a SUM and its unit count; the training loop divides the sum
over an optimizer step's micro-batches by the total units of that step (as the offline loop does),
so gradient accumulation gives the papers' aggregation exactly. Metrics are `(sum, count)` pairs of
python floats (average across micro-batches as sum(sums) / sum(counts)) or python floats.

Policy losses, rho = exp(log pi_theta - log pi_old):

    PPO/GRPO token level   (arXiv 1707.06347)  max(-A rho_t, -A clip(rho_t, 1 - eps_low, 1 + eps_high))
    DAPO clip-higher       (arXiv 2503.14476)  the same with eps_high > eps_low (0.2 / 0.28)
    GSPO                   (arXiv 2507.18071)  max(-A s_i, -A clip(s_i, 1 - eps_low, 1 + eps_high)) per SEQUENCE,
                                               s_i = exp(mean_t log rho_t) (length-normalised sequence ratio)
    CISPO                  (arXiv 2506.13585)  -sg(clip(rho_t, 1 - eps_low, 1 + eps_high)) A log pi_theta per token
    RLOO / REINFORCE       (arXiv 2402.14740)  -A_i log pi_theta(y_i | x), summed token log-probs;
                                               sequence-level clip with rho_i when reusing a batch
    PPO value loss         (arXiv 2203.02155, 2403.17031)  0.5 max((V - G)^2, (clip(V, V_old +- eps_v) - G)^2)

Token aggregations of a per-token loss l_{i,t} over a step's sequences i and valid tokens t:

    "grpo"     (1/N) sum_i (1/|o_i|) sum_t l_{i,t}         per-sequence mean: LENGTH-BIASED
    "dapo"     sum_i sum_t l_{i,t} / sum_i |o_i|            token mean over the whole step
    "dr_grpo"  sum_i sum_t l_{i,t} / (N L_max)              constant normaliser
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("grpo", "dapo", "token", "dr_grpo")
# GRPO's loss_type: the policy loss and the aggregation each one uses (the grpo row of engine/registry.py lists the same).
# GSPO averages its per-sequence losses over sequences (the paper's 1/G sum_i), which is the "grpo" aggregation of a
# loss every token of the sequence carries; CISPO normalises by the step's token count, like DAPO.
GRPO_LOSS_AGGREGATION = {"grpo": "grpo", "dapo": "dapo", "dr_grpo": "dr_grpo", "gspo": "grpo", "cispo": "dapo"}
# Each loss_type's paper clip range (eps_low, eps_high); the grpo row's clip_defaults (engine/registry.py) fill a spec's null epsilon from it.
GSPO_CLIP = (3e-4, 4e-4)  # Zheng et al. 2025, section 5.1: "3e-4 and 4e-4" (left, right)
CISPO_CLIP = (1.0, 4.0)  # no lower bound (MiniMax-M1); weight capped at 5 (see cispo_policy_loss)


# ---------------------------------------------------------------- helpers


def _masked_sum_count(values: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(sum over valid entries, number of valid entries) as python floats."""
    return float(values.detach()[mask].sum()), float(mask.sum())


# ---------------------------------------------------------------- policy losses


def _clip_metrics(
    clip_active: torch.Tensor,
    clip_low: torch.Tensor,
    clip_high: torch.Tensor,
    ratio: torch.Tensor,
    log_ratio: torch.Tensor,
    valid: torch.Tensor,
) -> dict[str, tuple[float, float]]:
    """The policy/* metrics every clipped policy loss logs, each (sum, count) over the valid tokens [B, T]."""
    dtype = ratio.dtype
    return {
        "policy/clipfrac": _masked_sum_count(clip_active.to(dtype), valid),
        "policy/clip_low_frac": _masked_sum_count(clip_low.to(dtype), valid),
        "policy/clip_high_frac": _masked_sum_count(clip_high.to(dtype), valid),
        "policy/ratio_mean": _masked_sum_count(ratio, valid),
        "policy/approx_kl": _masked_sum_count(0.5 * log_ratio**2, valid),
    }


def _check_clip(eps_low: float, eps_high: float) -> None:
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"clip ranges must be >= 0 (got eps_low={eps_low}, eps_high={eps_high})")


def _token_log_ratio(logps: torch.Tensor, old_logps: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log rho_t = logps - old_logps on valid tokens, 0 on padding (garbage there never reaches exp)."""
    return torch.where(valid, logps - old_logps.detach(), torch.zeros_like(logps))


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, tuple[float, float]]]:
    """Per-token PPO / GRPO clipped surrogate loss [B, T] (PPO arXiv 1707.06347; GRPO arXiv 2402.03300).

        rho_t = exp(logps_t - old_logps_t)
        loss_t = max(-A rho_t, -A clip(rho_t, 1 - eps_low, 1 + eps_high))     (= -min(...) of the objective)

    eps_high None means eps_high = eps_low (symmetric PPO); DAPO's clip-higher uses 0.2 / 0.28
    (arXiv 2503.14476). `advantages` is [B] (one per sequence: GRPO, broadcast over its tokens) or
    [B, T] (per token: PPO with GAE). old_logps and advantages are constants (detached here). The
    loss is 0 on padding (padding log-probs never reach exp, so garbage there cannot make NaNs).
    Add a KL term (e.g. beta * token_kl(..., "k3") for GRPO) before aggregating, if wanted.

    With logps == old_logps (first minibatch on-policy, mu = 1) rho is exactly 1 and d loss_t / d logps_t = -A.

    Metrics, each (sum, count) over valid tokens as python floats:
    - policy/clipfrac: the clipped term is active, i.e. the clipped objective is strictly smaller
      (rho > 1 + eps_high with A > 0, or rho < 1 - eps_low with A < 0): zero gradient there.
    - policy/clip_low_frac: rho < 1 - eps_low and A < 0.  policy/clip_high_frac: rho > 1 + eps_high and A > 0.
    - policy/ratio_mean: mean rho (should stay near 1).
    - policy/approx_kl: mean 0.5 (logps - old_logps)^2, the old -> new approximate KL.
    """
    if eps_high is None:
        eps_high = eps_low
    _check_clip(eps_low, eps_high)
    valid = mask.bool()
    advantages = advantages.detach()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # [B] -> [B, 1], broadcast over tokens
    advantages = advantages.expand_as(logps)
    log_ratio = _token_log_ratio(logps, old_logps, valid)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = torch.where(valid, torch.maximum(unclipped, clipped), torch.zeros_like(unclipped))

    with torch.no_grad():
        clip_low = (ratio < 1 - eps_low) & (advantages < 0)
        clip_high = (ratio > 1 + eps_high) & (advantages > 0)
        metrics = _clip_metrics(clipped > unclipped, clip_low, clip_high, ratio, log_ratio, valid)
    return per_token, metrics


def gspo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = GSPO_CLIP[0],
    eps_high: float | None = GSPO_CLIP[1],
) -> tuple[torch.Tensor, dict[str, tuple[float, float]]]:
    """Per-sequence GSPO loss [B] (Group Sequence Policy Optimization, Zheng et al. 2025, arXiv 2507.18071).

        s_i    = (pi_theta(y_i | x) / pi_old(y_i | x)) ^ (1 / |y_i|) = exp((1 / |y_i|) sum_t (logps_t - old_logps_t))
        loss_i = max(-A_i s_i, -A_i clip(s_i, 1 - eps_low, 1 + eps_high))

    The importance ratio is the length-normalised SEQUENCE likelihood ratio (a geometric mean of the
    token ratios), clipped per sequence: a sequence whose ratio left the range in the direction its
    advantage pushes contributes no gradient at all, instead of GRPO dropping single tokens. Sum the
    losses and divide by the number of sequences (the paper's 1/G sum_i; the "grpo" aggregation of a
    loss each of the sequence's tokens carries). `advantages` is [B] (one per sequence, detached here).

    Clip range: the paper uses 3e-4 (left) and 4e-4 (right), two orders of magnitude below GRPO's 0.2,
    because s_i is a per-token geometric mean and moves far less than a single token's ratio; with 0.2 the
    clip would almost never act. eps_high None means eps_high = eps_low.

    Gradient (unclipped): -A_i s_i (1/|y_i|) sum_t grad log pi(y_it): every token of a sequence gets the
    same weight. At s_i = 1 (on-policy) it equals GRPO's per-sequence-mean ("grpo") gradient.
    A row without valid tokens gets loss 0 and ratio 1.

    Metrics, (sum, count) over valid TOKENS like clipped_policy_loss's, each token carrying its sequence's
    value, so policy/clipfrac is again the fraction of tokens the clip leaves without gradient (the paper's
    "fraction of clipped tokens", which it finds two orders of magnitude above GRPO's):
    - policy/clipfrac: tokens of sequences whose clipped term is active.
    - policy/clip_low_frac: s_i < 1 - eps_low with A_i < 0.  policy/clip_high_frac: s_i > 1 + eps_high with A_i > 0.
    - policy/ratio_mean: token-weighted mean of s_i.  policy/approx_kl: mean 0.5 (logps - old_logps)^2 per TOKEN.
    """
    if eps_high is None:
        eps_high = eps_low
    _check_clip(eps_low, eps_high)
    valid = mask.bool()
    advantages = advantages.detach()
    log_ratio = _token_log_ratio(logps, old_logps, valid)
    lengths = valid.sum(dim=-1)
    seq_log_ratio = log_ratio.sum(dim=-1) / lengths.clamp(min=1).to(log_ratio.dtype)
    seq_ratio = torch.exp(seq_log_ratio)
    unclipped = -advantages * seq_ratio
    clipped = -advantages * torch.clamp(seq_ratio, 1 - eps_low, 1 + eps_high)
    has_tokens = lengths > 0
    per_sequence = torch.where(has_tokens, torch.maximum(unclipped, clipped), torch.zeros_like(unclipped))

    def per_token(x: torch.Tensor) -> torch.Tensor:  # a sequence's value on each of its tokens
        return x.unsqueeze(-1).expand_as(valid)

    with torch.no_grad():
        metrics = _clip_metrics(
            per_token(clipped > unclipped),
            per_token((seq_ratio < 1 - eps_low) & (advantages < 0)),
            per_token((seq_ratio > 1 + eps_high) & (advantages > 0)),
            per_token(seq_ratio),
            log_ratio,
            valid,
        )
    return per_sequence, metrics


def cispo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = CISPO_CLIP[0],
    eps_high: float = CISPO_CLIP[1],
) -> tuple[torch.Tensor, dict[str, tuple[float, float]]]:
    """Per-token CISPO loss [B, T] (Clipped IS-weight Policy Optimization, MiniMax-M1, arXiv 2506.13585).

        rho_t  = exp(logps_t - old_logps_t)
        loss_t = -sg(clip(rho_t, 1 - eps_low, 1 + eps_high)) A log pi_theta(y_t)

    The importance-sampling WEIGHT is clipped and detached (sg = stop-gradient), and the policy gradient
    flows through log pi_theta: gradient -clip(rho_t) A grad log pi(y_t). Unlike PPO/GRPO, no token ever
    loses its gradient; a token whose ratio left the range keeps it, scaled by the bound. At rho = 1
    (on-policy) the gradient equals GRPO's. The paper normalises by the step's token count (1 / sum_i |o_i|,
    the "dapo" aggregation). As with REINFORCE, the loss VALUE (-A log pi) is not a number to watch.

    Clip range: MiniMax-M1 sets no lower bound (a large eps_low: 1.0 makes the bound 0 here) and tunes
    only eps_high, without publishing it. The default 4.0 caps the weight at 5, the cap TRL's
    reproduction of ScaleRL (Khatri et al. 2025, arXiv 2510.13786, which adopts CISPO) uses.

    Metrics, (sum, count) over valid tokens as python floats; the clip fractions count tokens whose WEIGHT
    was truncated, whatever the sign of A (those tokens still get a gradient, unlike GRPO's clipped ones):
    - policy/clipfrac: rho_t outside [1 - eps_low, 1 + eps_high].
    - policy/clip_low_frac: rho_t < 1 - eps_low.  policy/clip_high_frac: rho_t > 1 + eps_high.
    - policy/ratio_mean: mean rho_t.  policy/approx_kl: mean 0.5 (logps - old_logps)^2.
    """
    _check_clip(eps_low, eps_high)
    valid = mask.bool()
    advantages = advantages.detach()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # [B] -> [B, 1], broadcast over tokens
    advantages = advantages.expand_as(logps)
    log_ratio = _token_log_ratio(logps, old_logps, valid)
    ratio = torch.exp(log_ratio).detach()
    weight = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    safe_logps = torch.where(valid, logps, torch.zeros_like(logps))  # padding garbage must not reach the sum
    per_token = torch.where(valid, -weight * advantages * safe_logps, torch.zeros_like(logps))

    with torch.no_grad():
        clip_low = ratio < 1 - eps_low
        clip_high = ratio > 1 + eps_high
        metrics = _clip_metrics(clip_low | clip_high, clip_low, clip_high, ratio, log_ratio, valid)
    return per_token, metrics


def aggregate_token_loss(
    per_token: torch.Tensor, mask: torch.Tensor, kind: str, max_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """Reduce a per-token loss [B, T] to (loss SUM as a scalar tensor, units).

    The caller divides sum(loss sums) by sum(units) over an optimizer step's micro-batches, which
    gives each paper's aggregation over the whole step:

    - "grpo" (GRPO, arXiv 2402.03300): sum over sequences of that sequence's masked token MEAN;
      units = sequences with >= 1 valid token. LENGTH-BIASED: a token of a sequence of length L
      weighs 1/L, so short correct answers get bigger per-token pushes and long wrong answers
      smaller per-token penalties, and failures drift longer (Dr. GRPO, arXiv 2503.20783).
    - "dapo" / "token" (DAPO token-level loss, arXiv 2503.14476; TRL's default): sum of all valid
      token losses; units = valid tokens. Every token weighs the same.
    - "dr_grpo" (Dr. GRPO, arXiv 2503.20783): sum of all valid token losses; units = B * max_len
      (rows in this micro-batch times the generation budget), a constant normaliser. max_len is
      required for "dr_grpo" and ignored by the other kinds.
    """
    if kind not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation '{kind}'; expected one of {', '.join(AGGREGATIONS)}")
    valid = mask.bool()
    masked = torch.where(valid, per_token, torch.zeros_like(per_token))
    if kind == "grpo":
        token_counts = valid.sum(dim=-1)
        per_sequence = masked.sum(dim=-1) / token_counts.clamp(min=1).to(per_token.dtype)
        return per_sequence.sum(), float((token_counts > 0).sum())
    if kind == "dr_grpo":
        if max_len is None or max_len < 1:
            raise ValueError(f"aggregation 'dr_grpo' needs max_len >= 1 (got {max_len})")
        return masked.sum(), float(per_token.shape[0] * max_len)
    return masked.sum(), float(valid.sum())


def sequence_policy_loss(
    seq_logps: torch.Tensor,
    old_seq_logps: torch.Tensor,
    advantages: torch.Tensor,
    eps: float | None = None,
) -> tuple[torch.Tensor, dict[str, tuple[float, float]]]:
    """Per-sequence policy loss [B] for RLOO (Ahmadian et al. 2024, arXiv 2402.14740).

    The whole completion is one action; seq_logps are SUMMED token log-probs [B].

    - eps None (REINFORCE, on-policy): loss_i = -A_i seq_logps_i. Its value is -A log pi (not a
      meaningful number to watch); its gradient is -A_i grad log pi(y_i | x), the RLOO estimator.
    - eps given (reusing a batch): loss_i = max(-A_i rho_i, -A_i clip(rho_i, 1 - eps, 1 + eps)),
      rho_i = exp(seq_logps_i - old_seq_logps_i). At rho = 1 the gradient is again -A_i grad log pi.

    Sum it and divide by the number of sequences (units = B) for the paper's -(1/k) sum_i A_i log pi.
    old_seq_logps and advantages are constants (detached here). Sequence ratios blow up quickly
    off-policy: stay close to on-policy.

    Metrics, (sum, count) over the B sequences as python floats: policy/clipfrac (the clipped term
    is strictly active; always 0 when eps is None), policy/ratio_mean (mean rho).
    """
    if eps is not None and eps < 0:
        raise ValueError(f"eps must be >= 0 (got {eps})")
    advantages = advantages.detach()
    log_ratio = seq_logps - old_seq_logps.detach()
    if eps is None:
        losses = -advantages * seq_logps
        ratio = torch.exp(log_ratio.detach())
        clip_active = torch.zeros_like(ratio)
    else:
        ratio = torch.exp(log_ratio)
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, 1 - eps, 1 + eps)
        losses = torch.maximum(unclipped, clipped)
        clip_active = (clipped > unclipped).to(ratio.dtype)
    count = float(seq_logps.shape[0])
    metrics = {
        "policy/clipfrac": (float(clip_active.detach().sum()), count),
        "policy/ratio_mean": (float(ratio.detach().sum()), count),
    }
    return losses, metrics


# ---------------------------------------------------------------- PPO: value loss


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, tuple[float, float]]]:
    """Per-token clipped value loss [B, T] (PPO as in InstructGPT arXiv 2203.02155 / N+ arXiv 2403.17031).

        V_clip = clip(V, V_old - clip, V_old + clip)
        loss_t = 0.5 max((V - G)^2, (V_clip - G)^2)

    Zero on padding; old_values and returns are constants (detached here). Aggregate like the
    policy loss and weight by vf_coef. Metric value/clipfrac = (sum, count) over valid tokens of
    tokens where the clipped term is strictly larger (the clip is the active branch).
    """
    valid = mask.bool()
    old_values = old_values.detach()
    returns = returns.detach()
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    per_token = 0.5 * torch.where(valid, torch.maximum(unclipped_loss, clipped_loss), torch.zeros_like(values))
    with torch.no_grad():
        clip_active = (clipped_loss > unclipped_loss).to(values.dtype)
        metrics = {"value/clipfrac": _masked_sum_count(clip_active, valid)}
    return per_token, metrics


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[G - V] / Var[G] over valid entries, as a python float.

    1 = the value function predicts the returns perfectly, 0 = no better than a constant, < 0 worse.
    Both variances use the same (population) denominator, which cancels in the ratio. When Var[G] = 0
    (constant returns, or fewer than 2 valid entries) the ratio is undefined and 0.0 is returned,
    never NaN.
    """
    valid = mask.bool()
    if int(valid.sum()) < 2:
        return 0.0
    g = returns.detach()[valid]
    v = values.detach()[valid]
    var_returns = g.var(correction=0)
    if var_returns == 0:
        return 0.0
    return float(1 - (g - v).var(correction=0) / var_returns)
