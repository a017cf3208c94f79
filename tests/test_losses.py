"""Loss functions against values computed by hand from the papers' formulas."""

import math

import torch

from engine.losses.dpo import dpo_loss


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_dpo_sigmoid_matches_hand_computed_values():
    # pair 0: chosen ratio -1 - (-2) = 1, rejected ratio -3 - (-2) = -1, h = 2, beta h = 0.2
    # pair 1: chosen ratio -5 - (-4) = -1, rejected ratio -1 - (-2) = 1, h = -2, beta h = -0.2
    losses, m = dpo_loss(_t(-1.0, -5.0), _t(-3.0, -1.0), _t(-2.0, -4.0), _t(-2.0, -2.0), beta=0.1)
    expected = [math.log(1 + math.exp(-0.2)), math.log(1 + math.exp(0.2))]
    assert torch.allclose(losses, _t(*expected), atol=1e-12)
    assert torch.allclose(m["rewards/chosen"], _t(0.1, -0.1))
    assert torch.allclose(m["rewards/rejected"], _t(-0.1, 0.1))
    assert torch.allclose(m["rewards/margin"], _t(0.2, -0.2))
    assert m["rewards/accuracy"].tolist() == [1.0, 0.0]
    assert m["logps/chosen"].tolist() == [-1.0, -5.0]
    assert m["logps/rejected"].tolist() == [-3.0, -1.0]


def test_dpo_at_zero_margin_is_log2_and_gradient_pushes_chosen_up():
    chosen = _t(-4.0).requires_grad_()
    rejected = _t(-4.0).requires_grad_()
    losses, _ = dpo_loss(chosen, rejected, _t(-4.0), _t(-4.0), beta=0.5)
    assert math.isclose(losses.item(), math.log(2), rel_tol=1e-12)
    losses.sum().backward()
    # d/dh -log sigmoid(beta h) at h=0 is -beta/2: raise chosen, lower rejected.
    assert math.isclose(chosen.grad.item(), -0.25) and math.isclose(rejected.grad.item(), 0.25)


def test_cdpo_label_smoothing_mixes_both_directions():
    eps, beta, h = 0.1, 0.2, 3.0
    losses, _ = dpo_loss(_t(h), _t(0.0), _t(0.0), _t(0.0), beta=beta, label_smoothing=eps)
    z = beta * h
    expected = (1 - eps) * math.log(1 + math.exp(-z)) + eps * math.log(1 + math.exp(z))
    assert math.isclose(losses.item(), expected, rel_tol=1e-12)


def test_dpo_is_finite_for_huge_margins():
    losses, _ = dpo_loss(_t(0.0, -1e4), _t(-1e4, 0.0), _t(0.0, 0.0), _t(0.0, 0.0), beta=1.0)
    assert torch.isfinite(losses).all()
    assert losses[0].item() < 1e-12 and math.isclose(losses[1].item(), 1e4, rel_tol=1e-9)
