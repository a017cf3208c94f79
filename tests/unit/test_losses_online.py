"""Online RL losses and helpers (engine/losses/online.py and advantages.py) against values computed by hand,
in float64."""

import math

import pytest
import torch

from engine.losses.advantages import (
    AdaptiveKLController,
    best_of_k_indices,
    bon_kl,
    gae,
    group_advantages,
    group_stats,
    ppo_token_rewards,
    quantile_threshold,
    rest_keep_mask,
    rloo_advantages,
    token_kl,
    whiten,
)
from engine.losses.online import (
    aggregate_token_loss,
    cispo_policy_loss,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gspo_policy_loss,
    sequence_policy_loss,
)


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def _m(*rows):
    """Float64 [B, T] tensor from nested lists."""
    return torch.tensor(rows, dtype=torch.float64)


def _close(got, want, tol=1e-12):
    got = torch.as_tensor(got, dtype=torch.float64)
    want = torch.as_tensor(want, dtype=torch.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.allclose(got, want, atol=tol, rtol=0), (got, want)


def _mean(pair):
    total, count = pair
    return total / count


# ---------------------------------------------------------------- group_advantages


def test_group_advantages_group_scale_matches_hand_values():
    # group 0: [1, 2, 3], mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1
    # group 1: [0, 0, 0], all equal -> 0
    adv = group_advantages(_t(1.0, 2.0, 3.0, 0.0, 0.0, 0.0), group_size=3)
    d = 1 + 1e-4
    _close(adv, [-1 / d, 0.0, 1 / d, 0.0, 0.0, 0.0])
    # group [0, 4]: mean 2, unbiased std sqrt((4 + 4) / 1) = 2 sqrt 2
    adv = group_advantages(_t(0.0, 4.0), group_size=2, eps=0.0)
    _close(adv, [-2 / (2 * math.sqrt(2)), 2 / (2 * math.sqrt(2))])


def test_group_advantages_batch_and_none_scales():
    rewards = _t(1.0, 2.0, 3.0, 0.0, 0.0, 0.0)
    # "none" (Dr. GRPO): only the group mean is removed
    _close(group_advantages(rewards, 3, scale="none"), [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    # "batch" (Lite-PPO): std of all six rewards, mean 1, squared deviations 0+1+4+1+1+1 = 8, / 5 = 1.6
    d = math.sqrt(1.6) + 1e-4
    _close(group_advantages(rewards, 3, scale="batch"), [-1 / d, 0.0, 1 / d, 0.0, 0.0, 0.0])


def test_group_advantages_sum_to_zero_per_group_and_zero_std_groups_get_zero():
    torch.manual_seed(0)
    rewards = torch.randn(24, dtype=torch.float64)
    rewards[8:12] = 0.7  # one all-equal group
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, 4, scale=scale)
        _close(adv.view(-1, 4).sum(dim=1), torch.zeros(6, dtype=torch.float64), tol=1e-10)
        assert adv[8:12].tolist() == [0.0] * 4


def test_group_advantages_group_of_one_is_zero_and_bad_arguments_raise():
    assert group_advantages(_t(1.0, 5.0, -2.0), 1).tolist() == [0.0, 0.0, 0.0]
    # integer rewards are accepted (converted to float)
    adv = group_advantages(torch.tensor([0, 1]), 2, scale="none")
    assert adv.is_floating_point() and adv.tolist() == [-0.5, 0.5]
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(_t(1.0, 2.0, 3.0), 2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(_t(1.0, 2.0), 2, scale="global")


# ---------------------------------------------------------------- group_stats


def test_group_stats_matches_hand_values():
    # group 0: [1, 2, 3, 4]: max 4, lower median 2, mean 2.5, unbiased var (2.25+0.25+0.25+2.25)/3 = 5/3
    # group 1: [5, 5, 5, 5]: max 5, median 5, std 0 (zero-std group)
    stats = group_stats(_t(1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0), 4)
    assert stats["frac_reward_zero_std"] == 0.5
    assert math.isclose(stats["reward/group_std_mean"], math.sqrt(5 / 3) / 2, rel_tol=1e-12)
    assert stats["reward/group_max_mean"] == 4.5  # (4 + 5) / 2
    assert stats["reward/group_median_mean"] == 3.5  # (2 + 5) / 2
    assert stats["reward/max_median_gap"] == 1.0  # ((4 - 2) + (5 - 5)) / 2
    assert all(isinstance(v, float) for v in stats.values())


def test_group_stats_zero_std_fraction_counts_all_equal_groups():
    # groups [0, 0], [1, 0], [1, 1]: two of three are all equal
    stats = group_stats(_t(0.0, 0.0, 1.0, 0.0, 1.0, 1.0), 2)
    assert math.isclose(stats["frac_reward_zero_std"], 2 / 3)
    assert group_stats(_t(3.0, 4.0), 1)["reward/group_std_mean"] == 0.0


# ---------------------------------------------------------------- rloo_advantages


def test_rloo_advantages_match_hand_values_and_scaled_centring():
    # [1, 2, 6]: A_0 = 1 - (2+6)/2 = -3, A_1 = 2 - (1+6)/2 = -1.5, A_2 = 6 - (1+2)/2 = 4.5
    _close(rloo_advantages(_t(1.0, 2.0, 6.0), 3), [-3.0, -1.5, 4.5])
    # = k/(k-1) (R - mean R) on random groups
    torch.manual_seed(1)
    rewards = torch.randn(20, dtype=torch.float64)
    grouped = rewards.view(-1, 4)
    expected = 4 / 3 * (grouped - grouped.mean(dim=1, keepdim=True))
    _close(rloo_advantages(rewards, 4), expected.view(-1), tol=1e-12)


def test_rloo_needs_two_samples():
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(_t(1.0, 2.0), 1)


# ---------------------------------------------------------------- token_kl


def test_token_kl_estimators_match_hand_values():
    logps = _t(-1.0, -3.0)
    ref = _t(-1.5, -2.0)  # l = 0.5, -1
    _close(token_kl(logps, ref, "k1"), [0.5, -1.0])
    _close(token_kl(logps, ref, "k2"), [0.125, 0.5])  # l^2 / 2
    _close(token_kl(logps, ref), [0.5, -1.0])  # default k1
    _close(token_kl(logps, ref, "k3"), [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0])
    with pytest.raises(ValueError, match="estimator"):
        token_kl(logps, ref, "k4")


def test_token_kl_expected_gradients_show_the_trap():
    # Exact expectation over a 4-token vocabulary: E_pi[grad k(l)] with the sampling weights pi held fixed.
    logits = _t(0.3, -0.2, 1.0, 0.1).requires_grad_()
    ref_logps = torch.log_softmax(_t(0.0, 0.5, -0.5, 0.2), dim=0)

    def expected_grad(estimator):
        logps = torch.log_softmax(logits, dim=0)
        weights = logps.exp().detach()
        (grad,) = torch.autograd.grad((weights * token_kl(logps, ref_logps, estimator)).sum(), logits)
        return grad

    def kl_grad(forward):
        logps = torch.log_softmax(logits, dim=0)
        if forward:  # KL(ref || pi)
            kl = (ref_logps.exp() * (ref_logps - logps)).sum()
        else:  # KL(pi || ref)
            kl = (logps.exp() * (logps - ref_logps)).sum()
        (grad,) = torch.autograd.grad(kl, logits)
        return grad

    _close(expected_grad("k1"), torch.zeros(4, dtype=torch.float64))  # E[grad k1] = 0
    _close(expected_grad("k2"), kl_grad(forward=False))  # reverse KL gradient
    _close(expected_grad("k3"), kl_grad(forward=True))  # FORWARD KL gradient


# ---------------------------------------------------------------- clipped_policy_loss


def _policy_example():
    mask = _m([1, 1, 1], [1, 1, 0])
    advantages = _t(2.0, -1.0)
    old = _m([-1.0, -2.0, -0.5], [-1.0, -3.0, 0.0])
    ratios = _m([1.5, 0.9, 1.0], [0.5, 1.5, 1.0])
    logps = (old + ratios.log()).clone()
    logps[1, 2] = float("nan")  # garbage on padding must not leak
    old[1, 2] = float("nan")
    return logps.requires_grad_(), old, advantages, mask


def test_clipped_policy_loss_matches_hand_values_and_metrics():
    logps, old, advantages, mask = _policy_example()
    loss, m = clipped_policy_loss(logps, old, advantages, mask, eps_low=0.2)
    # row 0, A = 2:  rho 1.5 -> max(-3.0, -2 * 1.2 = -2.4) = -2.4 (clipped, high)
    #                rho 0.9 -> max(-1.8, -1.8) = -1.8 (inside the range)
    #                rho 1.0 -> -2.0
    # row 1, A = -1: rho 0.5 -> max(0.5, 1 * 0.8 = 0.8) = 0.8 (clipped, low)
    #                rho 1.5 -> max(1.5, 1.2) = 1.5 (unclipped side is larger: no clip)
    #                padding -> 0
    _close(loss, _m([-2.4, -1.8, -2.0], [0.8, 1.5, 0.0]))
    assert m["policy/clipfrac"] == (2.0, 5.0)
    assert m["policy/clip_low_frac"] == (1.0, 5.0)
    assert m["policy/clip_high_frac"] == (1.0, 5.0)
    assert math.isclose(_mean(m["policy/ratio_mean"]), (1.5 + 0.9 + 1.0 + 0.5 + 1.5) / 5, rel_tol=1e-12)
    log_ratios = [math.log(1.5), math.log(0.9), 0.0, math.log(0.5), math.log(1.5)]
    assert math.isclose(_mean(m["policy/approx_kl"]), sum(0.5 * x * x for x in log_ratios) / 5, rel_tol=1e-12)
    assert all(isinstance(v, float) for pair in m.values() for v in pair)
    # gradient: -A rho where the unclipped term is active, 0 where the clip is active or on padding
    loss.sum().backward()
    _close(logps.grad, _m([0.0, -2 * 0.9, -2.0], [0.0, 1.5, 0.0]))


def test_clipped_policy_loss_at_ratio_one_gives_minus_advantage_gradient():
    torch.manual_seed(2)
    old = -torch.rand(3, 5, dtype=torch.float64) * 4
    logps = old.clone().requires_grad_()
    advantages = torch.randn(3, dtype=torch.float64)
    mask = _m([1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0])
    loss, m = clipped_policy_loss(logps, old, advantages, mask)
    assert m["policy/ratio_mean"] == (10.0, 10.0)  # rho exactly 1 on every valid token
    assert m["policy/clipfrac"] == (0.0, 10.0)
    assert m["policy/approx_kl"] == (0.0, 10.0)
    loss.sum().backward()
    _close(logps.grad, -advantages.unsqueeze(-1) * mask)


def test_clipped_policy_loss_clip_side_and_asymmetric_eps():
    old = _m([0.0, 0.0, 0.0, 0.0])
    mask = _m([1, 1, 1, 1])
    ratios = _t(1.25, 1.25, 0.75, 0.75)
    advantages = _m([1.0, -1.0, 1.0, -1.0])  # per-token advantages [B, T]
    logps = ratios.log().unsqueeze(0).requires_grad_()
    loss, m = clipped_policy_loss(logps, old, advantages, mask, eps_low=0.2)
    # rho 1.25 > 1.2: clipped for A > 0 (gradient 0), not for A < 0; rho 0.75 < 0.8: clipped for A < 0 only
    _close(loss, _m([-1.2, 1.25, -0.75, 0.8]))
    loss.sum().backward()
    _close(logps.grad, _m([0.0, 1.25, -0.75, 0.0]))
    assert m["policy/clip_high_frac"] == (1.0, 4.0) and m["policy/clip_low_frac"] == (1.0, 4.0)
    # DAPO clip-higher: eps_high 0.28 lets rho 1.25 through for A > 0
    loss, m = clipped_policy_loss(logps, old, advantages, mask, eps_low=0.2, eps_high=0.28)
    _close(loss, _m([-1.25, 1.25, -0.75, 0.8]))
    assert m["policy/clip_high_frac"] == (0.0, 4.0) and m["policy/clipfrac"] == (1.0, 4.0)


# ---------------------------------------------------------------- GSPO (arXiv 2507.18071)


def _gspo_example():
    """Row 0: A = 2, token ratios 1.5, 0.9, 1.0 -> s = 1.35^(1/3); row 1: A = 1, ratios 0.5, 1.5 -> s = 0.75^(1/2);
    row 2: no valid token. Padding holds NaN, which must not leak."""
    mask = _m([1, 1, 1], [1, 1, 0], [0, 0, 0])
    advantages = _t(2.0, 1.0, 3.0)
    old = _m([-1.0, -2.0, -0.5], [-1.0, -3.0, 0.0], [0.0, 0.0, 0.0])
    ratios = _m([1.5, 0.9, 1.0], [0.5, 1.5, 1.0], [1.0, 1.0, 1.0])
    logps = (old + ratios.log()).clone()
    logps[1, 2] = float("nan")
    old[1, 2] = float("nan")
    logps[2] = float("nan")
    return logps.requires_grad_(), old, advantages, mask


def test_gspo_loss_matches_hand_values_metrics_and_gradient():
    logps, old, advantages, mask = _gspo_example()
    loss, m = gspo_policy_loss(logps, old, advantages, mask, eps_low=0.05, eps_high=0.05)
    s0, s1 = 1.35 ** (1 / 3), 0.75**0.5  # 1.1052 and 0.8660
    # row 0: s0 > 1.05 with A = 2 > 0: max(-2 s0, -2 * 1.05) = -2.1 (clipped: no gradient)
    # row 1: s1 < 0.95 but A = 1 > 0: max(-s1, -0.95) = -s1 (the unclipped term is active)
    # row 2: no tokens -> 0
    _close(loss, [-2.1, -s1, 0.0])
    # per TOKEN, each token carrying its sequence's value: row 0's 3 tokens are clipped, of 5 valid tokens
    assert m["policy/clipfrac"] == (3.0, 5.0)
    assert m["policy/clip_high_frac"] == (3.0, 5.0) and m["policy/clip_low_frac"] == (0.0, 5.0)
    assert math.isclose(_mean(m["policy/ratio_mean"]), (3 * s0 + 2 * s1) / 5, rel_tol=1e-12)
    log_ratios = [math.log(1.5), math.log(0.9), 0.0, math.log(0.5), math.log(1.5)]
    assert math.isclose(_mean(m["policy/approx_kl"]), sum(0.5 * x * x for x in log_ratios) / 5, rel_tol=1e-12)
    assert all(isinstance(v, float) for pair in m.values() for v in pair)
    # gradient of -A s with s = exp(mean_t log rho_t): -A s / |y| on each valid token of an unclipped sequence
    loss.sum().backward()
    _close(logps.grad, _m([0.0, 0.0, 0.0], [-s1 / 2, -s1 / 2, 0.0], [0.0, 0.0, 0.0]))


def test_gspo_clips_low_side_for_negative_advantages_and_uses_the_papers_tiny_range_by_default():
    logps, old, _, mask = _gspo_example()
    loss, m = gspo_policy_loss(logps, old, _t(2.0, -1.0, 0.0), mask, eps_low=0.05, eps_high=0.05)
    # row 1 with A = -1: max(s1, 0.95) = 0.95, clipped low
    _close(loss[1], 0.95)
    assert m["policy/clip_low_frac"] == (2.0, 5.0) and m["policy/clipfrac"] == (5.0, 5.0)
    # defaults 3e-4 / 4e-4 (the paper's): a sequence ratio of 1.001 with A > 0 is already clipped
    old = _m([-1.0, -1.0])
    logps = (old + math.log(1.001)).requires_grad_()
    loss, m = gspo_policy_loss(logps, old, _t(1.0), _m([1, 1]))
    _close(loss, [-(1 + 4e-4)])
    assert m["policy/clipfrac"] == (2.0, 2.0)
    loss, _ = gspo_policy_loss((old + math.log(0.999)), old, _t(-1.0), _m([1, 1]))
    _close(loss, [1 - 3e-4])


def test_gspo_on_policy_gradient_is_grpos_per_sequence_mean():
    """At s = 1 GSPO's gradient, averaged over sequences, is GRPO's with the "grpo" aggregation."""
    torch.manual_seed(4)
    old = -torch.rand(3, 5, dtype=torch.float64) * 4
    advantages = torch.randn(3, dtype=torch.float64)
    mask = _m([1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0])
    gspo_logps = old.clone().requires_grad_()
    loss, m = gspo_policy_loss(gspo_logps, old, advantages, mask)
    (loss.sum() / 3).backward()
    grpo_logps = old.clone().requires_grad_()
    per_token, _ = clipped_policy_loss(grpo_logps, old, advantages, mask)
    total, units = aggregate_token_loss(per_token, mask, "grpo")
    (total / units).backward()
    _close(gspo_logps.grad, grpo_logps.grad)
    _close(loss, -advantages)
    assert m["policy/clipfrac"] == (0.0, 10.0) and m["policy/ratio_mean"] == (10.0, 10.0)


# ---------------------------------------------------------------- CISPO (MiniMax-M1, arXiv 2506.13585)


def _cispo_example():
    """log pi = [[-0.5, -1, -2], [-1.5, -0.25, pad]], ratios [[1.5, 0.9, 6], [0.5, 1.5, pad]], A = [2, -1]."""
    mask = _m([1, 1, 1], [1, 1, 0])
    logps = _m([-0.5, -1.0, -2.0], [-1.5, -0.25, float("nan")])
    old = logps - _m([1.5, 0.9, 6.0], [0.5, 1.5, 1.0]).log()
    return logps.requires_grad_(), old, _t(2.0, -1.0), mask


def test_cispo_loss_matches_hand_values_metrics_and_gradient():
    logps, old, advantages, mask = _cispo_example()
    loss, m = cispo_policy_loss(logps, old, advantages, mask, eps_low=1.0, eps_high=4.0)
    # weights clip(rho, 0, 5): [1.5, 0.9, 5], [0.5, 1.5]; loss_t = -w A log pi
    # row 0 (A = 2): -1.5*2*-0.5 = 1.5, -0.9*2*-1 = 1.8, -5*2*-2 = 20; row 1 (A = -1): -0.5*-1*-1.5 = -0.75, -1.5*-1*-0.25 = -0.375
    _close(loss, _m([1.5, 1.8, 20.0], [-0.75, -0.375, 0.0]))
    # the weight is detached: gradient -w A on EVERY valid token, the truncated one (rho 6) included
    loss.sum().backward()
    _close(logps.grad, _m([-3.0, -1.8, -10.0], [0.5, 1.5, 0.0]))
    assert m["policy/clipfrac"] == (1.0, 5.0) and m["policy/clip_high_frac"] == (1.0, 5.0)
    assert m["policy/clip_low_frac"] == (0.0, 5.0)  # eps_low = 1: no lower bound
    assert math.isclose(_mean(m["policy/ratio_mean"]), (1.5 + 0.9 + 6.0 + 0.5 + 1.5) / 5, rel_tol=1e-12)
    assert all(isinstance(v, float) for pair in m.values() for v in pair)


def test_cispo_keeps_the_gradient_where_grpo_drops_it():
    logps, old, advantages, mask = _cispo_example()
    # with a lower bound 0.8, rho 0.5 (A = -1) gets weight 0.8 and still a gradient 0.8; GRPO's clip zeroes it
    loss, m = cispo_policy_loss(logps, old, advantages, mask, eps_low=0.2, eps_high=4.0)
    _close(loss[1, 0], -0.8 * -1 * -1.5)
    loss.sum().backward()
    assert math.isclose(logps.grad[1, 0].item(), 0.8, rel_tol=1e-12)
    assert m["policy/clip_low_frac"] == (1.0, 5.0) and m["policy/clipfrac"] == (2.0, 5.0)
    grpo_logps = logps.detach().clone().requires_grad_()
    grpo_loss, _ = clipped_policy_loss(grpo_logps, old, advantages, mask, eps_low=0.2, eps_high=4.0)
    torch.where(mask.bool(), grpo_loss, torch.zeros_like(grpo_loss)).sum().backward()
    assert grpo_logps.grad[1, 0].item() == 0.0


def test_cispo_on_policy_gradient_is_dapos():
    torch.manual_seed(5)
    old = -torch.rand(3, 5, dtype=torch.float64) * 4
    advantages = torch.randn(3, dtype=torch.float64)
    mask = _m([1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0])
    grads = []
    for fn in (cispo_policy_loss, clipped_policy_loss):
        logps = old.clone().requires_grad_()
        per_token, m = fn(logps, old, advantages, mask)
        total, units = aggregate_token_loss(per_token, mask, "dapo")
        (total / units).backward()
        grads.append(logps.grad)
        assert m["policy/clipfrac"] == (0.0, 10.0)
    _close(grads[0], grads[1])
    _close(grads[0], -advantages.unsqueeze(-1) * mask / 10)


# ---------------------------------------------------------------- aggregate_token_loss


def _aggregation_example():
    per_token = _m([1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 7.0], [9.0, 9.0, 9.0, 9.0])  # 7s and 9s are padding
    mask = _m([1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0])
    return per_token, mask


def test_aggregate_token_loss_three_kinds():
    per_token, mask = _aggregation_example()
    # grpo: per-sequence means 10/4 = 2.5 and 11/2 = 5.5; the empty row counts for nothing
    total, units = aggregate_token_loss(per_token, mask, "grpo")
    assert total.item() == 8.0 and units == 2.0
    # dapo / token: 1+2+3+4+5+6 = 21 over 6 tokens
    for kind in ("dapo", "token"):
        total, units = aggregate_token_loss(per_token, mask, kind)
        assert total.item() == 21.0 and units == 6.0
    # dr_grpo: 21 over B * max_len = 3 * 4
    total, units = aggregate_token_loss(per_token, mask, "dr_grpo", max_len=4)
    assert total.item() == 21.0 and units == 12.0
    assert isinstance(units, float) and total.dim() == 0
    with pytest.raises(ValueError, match="max_len"):
        aggregate_token_loss(per_token, mask, "dr_grpo")
    with pytest.raises(ValueError, match="aggregation"):
        aggregate_token_loss(per_token, mask, "seq")


def test_aggregation_length_bias_grpo_vs_dapo():
    # A short (2 tokens) and a long (6 tokens) completion with the same advantage A = 1, at rho = 1.
    mask = _m([1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1])
    old = torch.full((2, 6), -1.0, dtype=torch.float64)
    advantages = _t(1.0, 1.0)
    weights = {}
    for kind in ("grpo", "dapo", "dr_grpo"):
        logps = old.clone().requires_grad_()
        per_token, _ = clipped_policy_loss(logps, old, advantages, mask)
        total, units = aggregate_token_loss(per_token, mask, kind, max_len=6)
        (total / units).backward()
        weights[kind] = logps.grad
    # grpo: -A / (|o_i| * N): short tokens -1/(2*2) = -0.25, long tokens -1/(6*2) = -1/12
    _close(weights["grpo"], _m([-0.25] * 2 + [0.0] * 4, [-1 / 12] * 6))
    # dapo: -A / (total tokens = 8) for every token, short or long
    _close(weights["dapo"], _m([-1 / 8] * 2 + [0.0] * 4, [-1 / 8] * 6))
    # dr_grpo: -A / (B * max_len = 12) for every token
    _close(weights["dr_grpo"], _m([-1 / 12] * 2 + [0.0] * 4, [-1 / 12] * 6))


def test_aggregation_over_micro_batches_equals_whole_batch():
    torch.manual_seed(3)
    per_token = torch.randn(4, 5, dtype=torch.float64)
    mask = _m([1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0])
    for kind in ("grpo", "dapo", "dr_grpo"):
        whole_total, whole_units = aggregate_token_loss(per_token, mask, kind, max_len=5)
        parts = [aggregate_token_loss(per_token[i : i + 2], mask[i : i + 2], kind, max_len=5) for i in (0, 2)]
        split = sum(t for t, _ in parts) / sum(u for _, u in parts)
        assert math.isclose(split.item(), (whole_total / whole_units).item(), rel_tol=1e-12)


# ---------------------------------------------------------------- sequence_policy_loss


def test_sequence_policy_loss_reinforce_value_and_gradient():
    seq_logps = _t(-3.0, -5.0).requires_grad_()
    loss, m = sequence_policy_loss(seq_logps, _t(-3.5, -5.0), _t(2.0, -1.0))
    # -A log pi: -2 * -3 = 6, 1 * -5 = -5; gradient -A
    _close(loss, [6.0, -5.0])
    loss.sum().backward()
    _close(seq_logps.grad, [-2.0, 1.0])
    assert m["policy/clipfrac"] == (0.0, 2.0)
    # rho = exp(0.5) and exp(0)
    assert math.isclose(_mean(m["policy/ratio_mean"]), (math.exp(0.5) + 1) / 2, rel_tol=1e-12)


def test_sequence_policy_loss_clipped_form():
    old = _t(-3.0, -5.0)
    advantages = _t(2.0, -1.0)
    # rho 1.5 with A = 2: max(-3, -2.4) = -2.4 (clipped); rho 0.5 with A = -1: max(0.5, 0.8) = 0.8 (clipped)
    seq_logps = (old + _t(1.5, 0.5).log()).requires_grad_()
    loss, m = sequence_policy_loss(seq_logps, old, advantages, eps=0.2)
    _close(loss, [-2.4, 0.8])
    loss.sum().backward()
    _close(seq_logps.grad, [0.0, 0.0])
    assert m["policy/clipfrac"] == (2.0, 2.0)
    assert math.isclose(_mean(m["policy/ratio_mean"]), 1.0, rel_tol=1e-12)
    # at rho = 1: loss -A, gradient -A rho = -A, same as REINFORCE
    seq_logps = old.clone().requires_grad_()
    loss, m = sequence_policy_loss(seq_logps, old, advantages, eps=0.2)
    _close(loss, [-2.0, 1.0])
    loss.sum().backward()
    _close(seq_logps.grad, [-2.0, 1.0])
    assert m["policy/clipfrac"] == (0.0, 2.0)


# ---------------------------------------------------------------- ppo_token_rewards


def test_ppo_token_rewards_put_score_at_last_valid_token():
    scores = _t(1.0, -2.0, 5.0, 0.5)
    logps = _m([-1.0, -2.0, -3.0], [-1.0, -1.0, 9.0], [0.0, 0.0, 0.0], [-2.0, 9.0, 9.0])
    ref = _m([-1.5, -2.0, -2.0], [-2.0, -0.5, 0.0], [0.0, 0.0, 0.0], [-1.0, 0.0, 0.0])
    mask = _m([1, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 0])
    rewards, kl = ppo_token_rewards(scores, logps, ref, mask, kl_coef=0.1)
    # k1 row 0: [0.5, 0, -1]; row 1: [1, -0.5, pad]; row 2 empty; row 3: [-1, pad, pad]
    _close(kl, _m([0.5, 0.0, -1.0], [1.0, -0.5, 0.0], [0.0, 0.0, 0.0], [-1.0, 0.0, 0.0]))
    expected = _m(
        [-0.05, 0.0, 0.1 + 1.0],  # score 1 on the 3rd token
        [-0.1, 0.05 - 2.0, 0.0],  # score -2 on the 2nd token, nothing on padding
        [0.0, 0.0, 0.0],  # no valid token: no score
        [0.1 + 0.5, 0.0, 0.0],  # length 1: score on the only token
    )
    _close(rewards, expected)
    assert not rewards.requires_grad


# ---------------------------------------------------------------- gae


def test_gae_matches_hand_values():
    rewards = _m([0.0, 0.0, 1.0])
    values = _m([0.5, 0.6, 0.7])
    mask = _m([1, 1, 1])
    # gamma 1, lam 0.95: delta = [0.6-0.5, 0.7-0.6, 1-0.7] = [0.1, 0.1, 0.3]
    # A_2 = 0.3, A_1 = 0.1 + 0.95*0.3 = 0.385, A_0 = 0.1 + 0.95*0.385 = 0.46575
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    _close(adv, _m([0.46575, 0.385, 0.3]))
    _close(ret, _m([0.96575, 0.985, 1.0]))
    # gamma 0.9, lam 0.5: delta = [0.9*0.6-0.5, 0.9*0.7-0.6, 1-0.7] = [0.04, 0.03, 0.3]
    # A_2 = 0.3, A_1 = 0.03 + 0.45*0.3 = 0.165, A_0 = 0.04 + 0.45*0.165 = 0.11425
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    _close(adv, _m([0.11425, 0.165, 0.3]))
    _close(ret, _m([0.61425, 0.765, 1.0]))


def test_gae_with_gamma_lam_one_is_reward_to_go_minus_value():
    torch.manual_seed(4)
    rewards = torch.randn(3, 6, dtype=torch.float64)
    values = torch.randn(3, 6, dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    reward_to_go = rewards.flip(-1).cumsum(-1).flip(-1)
    _close(adv, reward_to_go - values, tol=1e-12)
    _close(ret, reward_to_go, tol=1e-12)


def test_gae_ignores_right_padding():
    torch.manual_seed(5)
    rewards = torch.randn(2, 5, dtype=torch.float64)
    values = torch.randn(2, 5, dtype=torch.float64)
    mask = _m([1, 1, 1, 1, 1], [1, 1, 1, 0, 0])
    padded_rewards, padded_values = rewards.clone(), values.clone()
    padded_rewards[1, 3:] = 100.0  # garbage on padding
    padded_values[1, 3:] = -50.0
    adv, ret = gae(padded_rewards, padded_values, mask, gamma=0.99, lam=0.9)
    # row 1 alone, unpadded, length 3: the episode ends at its 3rd token
    short_adv, short_ret = gae(rewards[1:, :3], values[1:, :3], torch.ones(1, 3, dtype=torch.float64), 0.99, 0.9)
    _close(adv[1, :3], short_adv[0])
    _close(ret[1, :3], short_ret[0])
    assert adv[1, 3:].tolist() == [0.0, 0.0] and ret[1, 3:].tolist() == [0.0, 0.0]
    full_adv, _ = gae(rewards[:1], values[:1], mask[:1], 0.99, 0.9)
    _close(adv[0], full_adv[0])


# ---------------------------------------------------------------- whiten


def test_whiten_matches_hand_values():
    values = _m([1.0, 3.0, 5.0, 100.0])
    mask = _m([1, 1, 1, 0])
    # mean 3, unbiased var (4 + 0 + 4) / 2 = 4, std 2
    _close(whiten(values, mask, eps=0.0), _m([-1.0, 0.0, 1.0, 0.0]))
    # shift_mean=False keeps the mean 3: (x - 3) / 2 + 3
    _close(whiten(values, mask, shift_mean=False, eps=0.0), _m([2.0, 3.0, 4.0, 0.0]))
    # default eps 1e-8: 1 / sqrt(4 + 1e-8)
    _close(whiten(values, mask), _m([-2.0, 0.0, 2.0, 0.0]) / math.sqrt(4 + 1e-8))
    with pytest.raises(ValueError, match="at least 2"):
        whiten(values, _m([1, 0, 0, 0]))


# ---------------------------------------------------------------- clipped_value_loss


def test_clipped_value_loss_matches_hand_values():
    values = _m([1.0, 2.0, 3.0, 3.0, 8.0]).requires_grad_()
    old_values = _m([0.5, 1.9, 2.0, 2.0, 0.0])
    returns = _m([2.0, 1.0, 4.0, 0.0, 0.0])
    mask = _m([1, 1, 1, 1, 0])
    loss, m = clipped_value_loss(values, old_values, returns, mask, clip=0.2)
    # t0: V_clip = 0.5 + 0.2 = 0.7; (1-2)^2 = 1 < (0.7-2)^2 = 1.69 -> 0.845 (clip active)
    # t1: V_clip = 2.0 (inside);   (2-1)^2 = 1 both                 -> 0.5
    # t2: V_clip = 2.2;            (3-4)^2 = 1 < (2.2-4)^2 = 3.24   -> 1.62 (clip active)
    # t3: V_clip = 2.2;            (3-0)^2 = 9 > (2.2-0)^2 = 4.84   -> 4.5 (unclipped larger)
    # t4: padding -> 0
    _close(loss, _m([0.845, 0.5, 1.62, 4.5, 0.0]))
    assert m["value/clipfrac"] == (2.0, 4.0)
    loss.sum().backward()
    # gradient V - G where the unclipped term is active, 0 where the clipped one is (clip saturated)
    _close(values.grad, _m([0.0, 1.0, 0.0, 3.0, 0.0]))


# ---------------------------------------------------------------- explained_variance


def test_explained_variance_values():
    mask = _m([1, 1, 1, 0])
    returns = _m([1.0, 2.0, 3.0, 50.0])
    assert explained_variance(returns.clone(), returns, mask) == 1.0
    # G - V = [0, 0, 1]: population var = 2/9; Var[G] = 2/3 -> 1 - (2/9)/(2/3) = 2/3
    ev = explained_variance(_m([1.0, 2.0, 2.0, -7.0]), returns, mask)
    assert math.isclose(ev, 2 / 3, rel_tol=1e-12)
    # a constant predictor explains nothing
    assert math.isclose(explained_variance(_m([5.0, 5.0, 5.0, 0.0]), returns, mask), 0.0, abs_tol=1e-12)
    # Var[G] = 0 (or too few entries): defined as 0.0, not NaN
    assert explained_variance(_m([1.0, 2.0, 3.0, 0.0]), _m([4.0, 4.0, 4.0, 0.0]), mask) == 0.0
    assert explained_variance(returns, returns, _m([1, 0, 0, 0])) == 0.0


# ---------------------------------------------------------------- AdaptiveKLController


def test_adaptive_kl_moves_toward_target_with_capped_step():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # KL 12: error 12/6 - 1 = 1, capped at 0.2 -> 0.2 * (1 + 0.2 * 100 / 10000) = 0.2 * 1.002
    assert math.isclose(ctl.update(12.0, 100), 0.2 * 1.002, rel_tol=1e-12)
    assert math.isclose(ctl.value, 0.2004, rel_tol=1e-12)
    # KL 6.6: error 0.1 (inside the cap) -> * (1 + 0.1 * 0.01)
    assert math.isclose(ctl.update(6.6, 100), 0.2004 * 1.001, rel_tol=1e-12)
    # KL 0: error -1, capped at -0.2 -> * (1 - 0.2 * 0.01)
    before = ctl.value
    assert math.isclose(ctl.update(0.0, 100), before * 0.998, rel_tol=1e-12)


def test_adaptive_kl_fixed_and_state_round_trip():
    fixed = AdaptiveKLController(0.05, target=None, horizon=10000)
    assert fixed.update(100.0, 512) == 0.05 and fixed.value == 0.05
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(12.0, 500)
    resumed = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value
    assert resumed.update(3.0, 10) == ctl.update(3.0, 10)


# ---------------------------------------------------------------- best-of-K, ReST, overlong penalty


def test_best_of_k_indices_first_max_on_ties():
    # groups [1, 3, 3] -> row 1 (first of the tied 3s); [0, 5, 5] -> row 4; [5, 2, 2] -> row 6
    idx = best_of_k_indices(_t(1.0, 3.0, 3.0, 0.0, 5.0, 5.0, 5.0, 2.0, 2.0), 3)
    assert idx.tolist() == [1, 4, 6] and idx.dtype == torch.int64
    assert best_of_k_indices(_t(7.0, 7.0, 7.0, 7.0), 4).tolist() == [0]
    with pytest.raises(ValueError):
        best_of_k_indices(_t(1.0, 2.0, 3.0), 2)


def test_bon_kl():
    assert bon_kl(1) == 0.0
    assert math.isclose(bon_kl(4), math.log(4) - 0.75, rel_tol=1e-12)
    assert math.isclose(bon_kl(16), math.log(16) - 15 / 16, rel_tol=1e-12)
    with pytest.raises(ValueError):
        bon_kl(0)


def test_quantile_threshold_and_keep_mask():
    rewards = torch.arange(1, 11, dtype=torch.float64)  # 1..10
    # keep 30%: k = 3, third largest = 8 -> keeps {8, 9, 10}
    tau = quantile_threshold(rewards, 0.3)
    assert tau == 8.0 and isinstance(tau, float)
    assert rest_keep_mask(rewards, tau).tolist() == [False] * 7 + [True] * 3
    # keep 70%: 0.7 * 10 is 7.000000000000001 in floats; still k = 7, seventh largest = 4
    assert quantile_threshold(rewards, 0.7) == 4.0
    assert quantile_threshold(rewards, 1.0) == 1.0  # keep everything
    assert quantile_threshold(rewards, 0.05) == 10.0  # k = ceil(0.5) = 1: at least one kept
    # ties at the threshold are all kept: [1, 2, 2, 2, 3] keep 40% -> k = 2, tau = 2, keeps 4
    tied = _t(1.0, 2.0, 2.0, 2.0, 3.0)
    assert rest_keep_mask(tied, quantile_threshold(tied, 0.4)).sum().item() == 4
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError):
            quantile_threshold(rewards, bad)


def test_the_registry_lists_the_same_grpo_loss_types_and_clip_defaults_as_the_losses():
    """The registry stays torch-free, so it keeps its own copies: they must match the losses'."""
    from engine.losses.online import CISPO_CLIP, GRPO_LOSS_AGGREGATION, GSPO_CLIP
    from engine.registry import ALGORITHMS

    assert set(ALGORITHMS["grpo"].loss_types) == set(GRPO_LOSS_AGGREGATION)
    assert ALGORITHMS["grpo"].clip_defaults == {"gspo": GSPO_CLIP, "cispo": CISPO_CLIP}
