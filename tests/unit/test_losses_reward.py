"""Reward-model loss, Llama 2 reward combination and SFT loss against values computed by hand."""

import math
import statistics

import pytest
import torch

from engine.losses.reward import combine_helpful_safety, logit_whiten, reward_eval_metrics, reward_model_loss
from engine.losses.sft import sft_loss


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_reward_loss_matches_hand_values_with_margin_and_centering():
    eta = 0.01
    losses, m = reward_model_loss(_t(2.0, 0.5), _t(1.0, 1.5), margin=_t(0.5, 0.0), center_coef=eta)
    # pair 0: d = 1, m = 0.5 -> log(1 + e^-0.5) + 0.01 * 9; pair 1: d = -1 -> log(1 + e^1) + 0.01 * 4
    expected = [math.log(1 + math.exp(-0.5)) + eta * 9, math.log(1 + math.exp(1.0)) + eta * 4]
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert m["rewards/chosen"].tolist() == [2.0, 0.5]
    assert m["rewards/rejected"].tolist() == [1.0, 1.5]
    assert m["rewards/margin"].tolist() == [1.0, -1.0]
    assert m["rewards/accuracy"].tolist() == [1.0, 0.0]


def test_reward_loss_defaults_and_float_margin():
    plain, _ = reward_model_loss(_t(0.3), _t(0.3))
    assert math.isclose(plain.item(), math.log(2), rel_tol=1e-12)
    shifted, _ = reward_model_loss(_t(1.0), _t(0.0), margin=2.0)
    assert math.isclose(shifted.item(), math.log(1 + math.exp(1.0)), rel_tol=1e-12)


def test_reward_loss_gradient_raises_chosen_and_lowers_rejected():
    eta = 0.01
    chosen = _t(0.5).requires_grad_()
    rejected = _t(1.0).requires_grad_()
    losses, _ = reward_model_loss(chosen, rejected, margin=1.0, center_coef=eta)
    losses.sum().backward()
    # z = d - m = -1.5; dL/dr_c = -sigmoid(-z) + 2 eta (r_c + r_r), dL/dr_r = sigmoid(-z) + 2 eta (r_c + r_r)
    s = 1 / (1 + math.exp(-1.5))
    assert math.isclose(chosen.grad.item(), -s + 2 * eta * 1.5, rel_tol=1e-12)
    assert math.isclose(rejected.grad.item(), s + 2 * eta * 1.5, rel_tol=1e-12)
    assert chosen.grad.item() < 0 < rejected.grad.item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reward_loss_is_finite_for_huge_rewards(dtype):
    chosen = torch.tensor([1e4, -1e4], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([-1e4, 1e4], dtype=dtype, requires_grad=True)
    losses, _ = reward_model_loss(chosen, rejected, center_coef=0.01)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all()
    assert losses[0].item() == pytest.approx(0.0, abs=1e-6) and losses[1].item() == pytest.approx(2e4, rel=1e-6)


def test_combine_helpful_safety_follows_llama2_rule():
    helpful = _t(0.9, 0.8, 0.7, 0.6)
    safety = _t(0.5, 0.1, 0.95, 0.15)
    tagged = torch.tensor([False, False, True, False])
    # 0: untagged, safe -> helpful; 1: safety < 0.15 -> safety; 2: tagged -> safety; 3: 0.15 is not < 0.15 -> helpful
    assert combine_helpful_safety(helpful, safety, tagged).tolist() == [0.9, 0.1, 0.95, 0.6]
    assert combine_helpful_safety(helpful, safety, tagged, safety_threshold=0.2).tolist() == [0.9, 0.1, 0.95, 0.15]
    with pytest.raises(ValueError, match="probabilities"):
        combine_helpful_safety(_t(1.5), _t(0.5), torch.tensor([False]))


def test_logit_whiten_matches_hand_values():
    scores = (0.2, 0.5, 0.9, 0.7)
    logits = [math.log(p / (1 - p)) for p in scores]
    mean, std = statistics.fmean(logits), statistics.pstdev(logits)
    got = logit_whiten(_t(*scores))
    assert got.tolist() == pytest.approx([(x - mean) / std for x in logits], rel=1e-9)
    assert abs(got.mean().item()) < 1e-12
    assert math.isclose(got.pow(2).mean().sqrt().item(), 1.0, rel_tol=1e-9)


def test_logit_whiten_is_finite_at_zero_one_and_for_one_score():
    got = logit_whiten(_t(0.0, 1.0))
    assert got.tolist() == pytest.approx([-1.0, 1.0], rel=1e-9)
    assert logit_whiten(_t(0.3)).tolist() == [0.0]
    assert logit_whiten(_t(0.3, 0.3)).tolist() == [0.0, 0.0]


def test_sft_loss_is_the_token_sum_of_nll():
    token_logps = _t(-1.0, -2.5, -0.25).requires_grad_()
    loss = sft_loss(token_logps)
    assert loss.dim() == 0 and loss.item() == 3.75
    loss.backward()
    assert token_logps.grad.tolist() == [-1.0, -1.0, -1.0]  # every token's probability pushed up


def test_reward_eval_metrics_match_hand_values():
    # scores: chosen (2, 1, 0), rejected (1, 1, 1); pair 1 is a tie, which counts as wrong
    m = reward_eval_metrics(_t(2.0, 1.0, 0.0), _t(1.0, 1.0, 1.0), torch.tensor([3, 2, 1]), torch.tensor([2, 2, 2]))
    assert m["rewards/accuracy"] == pytest.approx(1 / 3)
    assert m["rewards/margin"] == pytest.approx(0.0)  # (1 + 0 - 1) / 3
    # all six scores (2, 1, 0, 1, 1, 1): mean 1, population variance 2/6
    assert m["rewards/mean"] == pytest.approx(1.0)
    assert m["rewards/std"] == pytest.approx(math.sqrt(1 / 3))
    assert (m["rewards/min"], m["rewards/max"]) == (0.0, 2.0)
    # lengths (3, 2, 1, 2, 2, 2) minus their mean 2 equal the scores minus theirs: correlation 1
    assert m["rewards/length_corr"] == pytest.approx(1.0)
    assert not any(name.startswith("rewards/accuracy_margin") for name in m)


def test_reward_eval_metrics_length_correlation_sign_and_constant_lengths():
    longer_is_worse = reward_eval_metrics(_t(1.0, 2.0), _t(0.0, 3.0), torch.tensor([4, 2]), torch.tensor([5, 1]))
    # scores (1, 2, 0, 3) vs lengths (4, 2, 5, 1): centred (-0.5, 0.5, -1.5, 1.5) . (1, -1, 2, -2) = -7;
    # norms sqrt(5) and sqrt(10) -> -7 / sqrt(50)
    assert longer_is_worse["rewards/length_corr"] == pytest.approx(-7 / math.sqrt(50))
    same_length = reward_eval_metrics(_t(1.0, 2.0), _t(0.0, 3.0), torch.tensor([2, 2]), torch.tensor([2, 2]))
    assert same_length["rewards/length_corr"] == 0.0
    assert reward_eval_metrics(_t(), _t(), torch.tensor([]), torch.tensor([])) == {}


def test_reward_eval_metrics_accuracy_per_margin_bucket():
    chosen, rejected = _t(1.0, 1.0, 0.0, 1.0), _t(0.0, 0.0, 1.0, 2.0)  # right, right, wrong, wrong
    lengths = torch.tensor([1, 1, 1, 1])
    m = reward_eval_metrics(chosen, rejected, lengths, lengths, margins=_t(0.0, 2 / 3, 2 / 3, 1.0))
    assert m["rewards/accuracy_margin_0"] == 1.0
    assert m["rewards/accuracy_margin_0.667"] == 0.5
    assert m["rewards/accuracy_margin_1"] == 0.0
    # more than MAX_MARGIN_BUCKETS distinct margins: quartiles by rank (9 pairs -> 3, 2, 2, 2)
    n = 9
    right = _t(*[1.0] * 5 + [0.0] * 4)  # the 5 smallest margins are right, the 4 largest wrong
    m = reward_eval_metrics(
        right, _t(*[0.5] * n), torch.ones(n), torch.ones(n), margins=_t(*[0.1 * i for i in range(n)])
    )
    assert m["rewards/accuracy_margin_q1"] == 1.0
    assert m["rewards/accuracy_margin_q2"] == 1.0
    assert m["rewards/accuracy_margin_q3"] == 0.0
    assert m["rewards/accuracy_margin_q4"] == 0.0
    assert m["rewards/accuracy"] == pytest.approx(5 / 9)
