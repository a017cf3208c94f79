"""KTO loss and weight-ratio check against values computed by hand."""

import math

import pytest
import torch

from engine.losses.kto import kto_loss, kto_weight_ratio_warning


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _example():
    policy = _t(-5.0, -7.0, -4.0, -9.0)  # r = policy - ref = 1, -1, 2, -3
    ref = _t(-6.0, -6.0, -6.0, -6.0)
    kl_policy = _t(-10.0, -12.0, -8.0, -11.0)  # mismatched-pair log-ratios 1, -1, 3, 0: mean 0.75
    kl_ref = _t(-11.0, -11.0, -11.0, -11.0)
    desirable = torch.tensor([True, False, True, False])
    return policy, ref, kl_policy, kl_ref, desirable


def test_kto_matches_hand_computed_values():
    policy, ref, kl_policy, kl_ref, desirable = _example()
    beta, w_d, w_u, z0 = 0.5, 1.5, 0.5, 0.75
    losses, m = kto_loss(policy, ref, kl_policy, kl_ref, desirable, beta, w_d, w_u)
    expected = [
        w_d * (1 - _sigmoid(beta * (1 - z0))),
        w_u * (1 - _sigmoid(beta * (z0 - (-1)))),
        w_d * (1 - _sigmoid(beta * (2 - z0))),
        w_u * (1 - _sigmoid(beta * (z0 - (-3)))),
    ]
    for got, want in zip(losses.tolist(), expected):
        assert math.isclose(got, want, rel_tol=1e-12)
    assert m["kl"].tolist() == [0.75] * 4
    assert m["rewards/desirable_sum"].tolist() == [0.5, 0.0, 1.0, 0.0]
    assert m["rewards/undesirable_sum"].tolist() == [0.0, -0.5, 0.0, -1.5]
    assert m["logps/desirable_sum"].tolist() == [-5.0, 0.0, -4.0, 0.0]
    assert m["logps/undesirable_sum"].tolist() == [0.0, -7.0, 0.0, -9.0]
    assert m["count/desirable"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert m["count/undesirable"].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert m["logps/policy"].tolist() == [-5.0, -7.0, -4.0, -9.0]
    # a caller's batch mean of the chosen reward: sum / count
    assert m["rewards/desirable_sum"].sum() / m["count/desirable"].sum() == 0.75


def test_kto_reference_point_is_clamped_at_zero_and_detached():
    policy, ref, _, _, desirable = _example()
    kl_policy = _t(-12.0, -13.0).requires_grad_()  # log-ratios -1, -2: mean < 0 -> z0 = 0
    kl_ref = _t(-11.0, -11.0)
    policy = policy.clone().requires_grad_()
    losses, m = kto_loss(policy, ref, kl_policy, kl_ref, desirable, 0.1)
    assert m["kl"].tolist() == [0.0] * 4
    assert math.isclose(losses[0].item(), 1 - _sigmoid(0.1 * 1.0), rel_tol=1e-12)
    assert math.isclose(losses[1].item(), 1 - _sigmoid(0.1 * 1.0), rel_tol=1e-12)
    losses.sum().backward()
    assert kl_policy.grad is None  # z0 carries no gradient
    assert all(not v.requires_grad for v in m.values())


def test_kto_gradient_raises_desirable_and_lowers_undesirable():
    policy, ref, kl_policy, kl_ref, desirable = _example()
    policy = policy.clone().requires_grad_()
    beta, z0 = 0.5, 0.75
    losses, _ = kto_loss(policy, ref, kl_policy, kl_ref, desirable, beta, 1.0, 2.0)
    losses.sum().backward()
    g = policy.grad.tolist()
    assert g[0] < 0 and g[2] < 0 and g[1] > 0 and g[3] > 0
    # d/dr [lambda_D (1 - s(beta (r - z0)))] = -lambda_D beta s(x)(1 - s(x)), x = beta (r - z0)
    x = beta * (1 - z0)
    assert math.isclose(g[0], -beta * _sigmoid(x) * (1 - _sigmoid(x)), rel_tol=1e-12)
    x = beta * (z0 - (-3))
    assert math.isclose(g[3], 2.0 * beta * _sigmoid(x) * (1 - _sigmoid(x)), rel_tol=1e-12)


def test_kto_single_class_batch_has_no_nan_metrics():
    policy, ref, kl_policy, kl_ref, _ = _example()
    losses, m = kto_loss(policy, ref, kl_policy, kl_ref, torch.ones(4, dtype=torch.bool), 0.1)
    assert torch.isfinite(losses).all()
    assert all(torch.isfinite(v).all() for v in m.values())
    assert m["count/undesirable"].sum().item() == 0.0 and m["rewards/undesirable_sum"].sum().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kto_is_finite_for_huge_log_probs(dtype):
    policy = torch.tensor([0.0, -1e30, 0.0, -1e30], dtype=dtype, requires_grad=True)
    ref = torch.tensor([-1e30, 0.0, -1e30, 0.0], dtype=dtype)
    kl = torch.tensor([-1e30, 0.0], dtype=dtype)
    desirable = torch.tensor([True, True, False, False])
    losses, m = kto_loss(policy, ref, torch.zeros(2, dtype=dtype), kl, desirable, 1.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(policy.grad).all()
    # z0 = 5e29; a reward of 1e30 (desirable) costs ~0, a reward of -1e30 (desirable) costs lambda_D
    assert losses.tolist() == pytest.approx([0.0, 1.0, 1.0, 0.0], abs=1e-12)
    assert all(torch.isfinite(v).all() for v in m.values())


def test_kto_rejects_bad_arguments():
    policy, ref, kl_policy, kl_ref, desirable = _example()
    with pytest.raises(ValueError, match="beta"):
        kto_loss(policy, ref, kl_policy, kl_ref, desirable, 0.0)
    with pytest.raises(ValueError, match="mismatched"):
        kto_loss(policy, ref, _t(), _t(), desirable, 0.1)


def test_weight_ratio_inside_band_gives_no_warning():
    assert kto_weight_ratio_warning(100, 100, 1.0, 1.0) is None  # ratio 1
    assert kto_weight_ratio_warning(400, 300, 1.0, 1.0) is None  # ratio 4/3
    assert kto_weight_ratio_warning(1, 3, 3.5, 1.0) is None  # 3.5/3 = 7/6
    assert kto_weight_ratio_warning(3, 2, 1.0, 1.25) is None  # 3/2.5 = 1.2


def test_weight_ratio_outside_band_suggests_weights_that_fix_it():
    msg = kto_weight_ratio_warning(3, 2, 1.0, 1.0)  # ratio 1.5 > 4/3
    assert msg is not None and "1.5" in msg
    # to 7/6: desirable_weight = 7/6 * 2/3 = 0.778, or undesirable_weight = 3 / (7/6 * 2) = 1.29
    assert "0.778" in msg and "1.29" in msg
    assert kto_weight_ratio_warning(3, 2, 0.778, 1.0) is None
    assert kto_weight_ratio_warning(3, 2, 1.0, 1.29) is None
    msg = kto_weight_ratio_warning(1, 3, 1.0, 1.0)  # ratio 1/3 < 1: up-weight desirable to 3.5
    assert msg is not None and "3.5" in msg
    assert kto_weight_ratio_warning(99, 100, 1.0, 1.0) is not None


def test_weight_ratio_with_a_missing_class_or_bad_input():
    assert "no desirable" in kto_weight_ratio_warning(0, 5, 1.0, 1.0)
    assert "no undesirable" in kto_weight_ratio_warning(5, 0, 1.0, 1.0)
    assert kto_weight_ratio_warning(0, 0, 1.0, 1.0) is not None
    with pytest.raises(ValueError):
        kto_weight_ratio_warning(5, 5, 0.0, 1.0)
    with pytest.raises(ValueError):
        kto_weight_ratio_warning(-1, 5, 1.0, 1.0)
