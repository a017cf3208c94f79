"""DPO-family losses (DPO, cDPO, robust, hinge, IPO, SimPO, RPO) against values computed by hand.

The other offline losses are in tests/unit/test_losses_{kto,orpo,reward}.py.
"""

import math

import pytest
import torch

from engine.losses.dpo import DPO_LOSS_TYPES, cpo_loss, dpo_loss, rpo_loss, simpo_loss


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def _softplus(x):
    """-log sigmoid(-x) = log(1 + e^x), by hand."""
    return math.log1p(math.exp(x)) if x < 30 else x + math.log1p(math.exp(-x))


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


# ---------------------------------------------------------------- loss_type variants of dpo_loss


def test_dpo_loss_types_constant_and_default_is_sigmoid():
    assert DPO_LOSS_TYPES == ("sigmoid", "robust", "hinge", "ipo")
    args = (_t(-1.0, -5.0), _t(-3.0, -1.0), _t(-2.0, -4.0), _t(-2.0, -2.0))
    default, _ = dpo_loss(*args, 0.1, 0.1)  # positional, as the training loop calls it
    explicit, _ = dpo_loss(*args, beta=0.1, label_smoothing=0.1, loss_type="sigmoid")
    assert torch.equal(default, explicit)


def test_robust_dpo_matches_hand_computed_values():
    eps, beta = 0.1, 0.2
    # h = 3 and h = -2 (rejected and references at 0)
    losses, m = dpo_loss(_t(3.0, -2.0), _t(0.0, 0.0), _t(0.0, 0.0), _t(0.0, 0.0), beta, eps, loss_type="robust")
    expected = []
    for h in (3.0, -2.0):
        z = beta * h
        # -(1-eps) log s(z) + eps log s(-z) = (1-eps) log(1+e^-z) - eps log(1+e^z)
        expected.append(((1 - eps) * math.log(1 + math.exp(-z)) - eps * math.log(1 + math.exp(z))) / (1 - 2 * eps))
    for got, want in zip(losses.tolist(), expected):
        assert math.isclose(got, want, rel_tol=1e-12)
    assert m["rewards/margin"].tolist() == pytest.approx([0.6, -0.4], rel=1e-12)


def test_robust_dpo_is_unbiased_under_label_flips_and_equals_dpo_at_zero_eps():
    # E over a flip with probability eps: (1-eps) L(h) + eps L(-h) == -log sigmoid(beta h).
    eps, beta, h = 0.2, 0.5, 1.7
    pair, _ = dpo_loss(_t(h, -h), _t(0.0, 0.0), _t(0.0, 0.0), _t(0.0, 0.0), beta, eps, loss_type="robust")
    expected = math.log(1 + math.exp(-beta * h))
    assert math.isclose((1 - eps) * pair[0].item() + eps * pair[1].item(), expected, rel_tol=1e-12)
    robust0, _ = dpo_loss(_t(h), _t(0.0), _t(0.0), _t(0.0), beta, 0.0, loss_type="robust")
    assert math.isclose(robust0.item(), expected, rel_tol=1e-12)


def test_hinge_matches_hand_values_and_gradient_vanishes_past_the_margin():
    beta = 0.5
    chosen = _t(1.0, 3.0, -2.0).requires_grad_()
    rejected = _t(0.0, 0.0, 0.0).requires_grad_()
    losses, _ = dpo_loss(chosen, rejected, _t(0.0, 0.0, 0.0), _t(0.0, 0.0, 0.0), beta, loss_type="hinge")
    # 1 - beta h = 0.5, -0.5 (-> 0), 2
    assert losses.tolist() == [0.5, 0.0, 2.0]
    losses.sum().backward()
    assert chosen.grad.tolist() == [-0.5, 0.0, -0.5]
    assert rejected.grad.tolist() == [0.5, 0.0, 0.5]


def test_ipo_matches_hand_values_and_pulls_h_towards_its_target():
    tau = 0.25  # target h = 1 / (2 tau) = 2 (per-token nats: the inputs are per-token means)
    chosen = _t(-1.0, -0.5).requires_grad_()
    rejected = _t(-2.0, -2.5).requires_grad_()
    ref_chosen, ref_rejected = _t(-1.5, -1.5), _t(-1.0, -0.5)
    losses, m = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, tau, loss_type="ipo")
    # h0 = 0.5 - (-1) = 1.5 -> (1.5 - 2)^2 = 0.25; h1 = 1 - (-2) = 3 -> (3 - 2)^2 = 1
    assert losses.tolist() == pytest.approx([0.25, 1.0], rel=1e-12)
    assert m["rewards/chosen"].tolist() == pytest.approx([0.125, 0.25], rel=1e-12)
    assert m["rewards/rejected"].tolist() == pytest.approx([-0.25, -0.5], rel=1e-12)
    assert m["logps/chosen"].tolist() == [-1.0, -0.5]
    losses.sum().backward()
    # dL/dchosen = 2 (h - 2): below target it raises chosen, above target it pulls back.
    assert chosen.grad.tolist() == pytest.approx([-1.0, 2.0], rel=1e-12)
    assert rejected.grad.tolist() == pytest.approx([1.0, -2.0], rel=1e-12)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_every_loss_type_pushes_chosen_up_and_rejected_down_at_zero_margin(loss_type):
    chosen = _t(-4.0).requires_grad_()
    rejected = _t(-4.0).requires_grad_()
    losses, _ = dpo_loss(chosen, rejected, _t(-4.0), _t(-4.0), 0.1, loss_type=loss_type)
    losses.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_loss_type_stays_finite_for_huge_log_probs(loss_type, dtype):
    eps = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    chosen = torch.tensor([0.0, -1e4, -1e4], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([-1e4, 0.0, -1e4], dtype=dtype, requires_grad=True)
    zeros = torch.zeros(3, dtype=dtype)
    losses, metrics = dpo_loss(chosen, rejected, zeros, zeros, 1.0, eps, loss_type=loss_type)
    losses.sum().backward()
    assert torch.isfinite(losses).all()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())


def test_dpo_with_huge_beta_approaches_the_hinge_limit():
    # softplus(-beta h) -> max(0, -beta h) as beta -> inf.
    beta = 1e4
    hs = (0.01, -0.01, 0.5, -0.3)
    losses, _ = dpo_loss(_t(*hs), _t(0, 0, 0, 0), _t(0, 0, 0, 0), _t(0, 0, 0, 0), beta)
    for h, got in zip(hs, losses.tolist()):
        limit = max(0.0, -beta * h)
        if limit > 0:
            assert math.isclose(got, limit, rel_tol=1e-6)
        else:
            assert 0 <= got <= 1e-6 * beta * abs(h)


def test_dpo_rejects_bad_arguments():
    x = _t(-1.0)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, 0.1, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, 0.1, 0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, 0.1, 0.5, loss_type="robust")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, 0.0, loss_type="ipo")


# ---------------------------------------------------------------- SimPO


def test_simpo_matches_hand_computed_values():
    beta, ratio = 2.0, 0.5  # gamma = 1
    losses, m = simpo_loss(_t(-0.5, -1.0), _t(-1.5, -1.2), beta, ratio)
    # z0 = -1 + 3 - 1 = 1; z1 = -2 + 2.4 - 1 = -0.6
    expected = [math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(0.6))]
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert m["rewards/chosen"].tolist() == pytest.approx([-1.0, -2.0], rel=1e-12)
    assert m["rewards/rejected"].tolist() == pytest.approx([-3.0, -2.4], rel=1e-12)
    assert m["rewards/margin"].tolist() == pytest.approx([2.0, 0.4], rel=1e-12)
    assert m["rewards/accuracy"].tolist() == [1.0, 1.0]  # margin > 0, gamma not included
    assert m["logps/chosen"].tolist() == [-0.5, -1.0]
    assert m["logps/rejected"].tolist() == [-1.5, -1.2]


def test_simpo_label_smoothing_and_gradient_direction():
    beta, ratio, eps = 2.5, 0.4, 0.1  # gamma = 1
    chosen = _t(-0.8).requires_grad_()
    rejected = _t(-1.0).requires_grad_()
    losses, _ = simpo_loss(chosen, rejected, beta, ratio, eps)
    z = 2.5 * -0.8 - 2.5 * -1.0 - 1.0  # -0.5
    expected = (1 - eps) * math.log(1 + math.exp(-z)) + eps * math.log(1 + math.exp(z))
    assert math.isclose(losses.item(), expected, rel_tol=1e-12)
    losses.sum().backward()
    # dL/dz = -(1-eps) sigmoid(-z) + eps sigmoid(z); dz/dchosen = beta
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    dz = -(1 - eps) * sig(-z) + eps * sig(z)
    assert math.isclose(chosen.grad.item(), beta * dz, rel_tol=1e-12) and chosen.grad.item() < 0
    assert math.isclose(rejected.grad.item(), -beta * dz, rel_tol=1e-12) and rejected.grad.item() > 0


def test_simpo_is_finite_for_huge_inputs():
    chosen = _t(0.0, -1e6).requires_grad_()
    losses, _ = simpo_loss(chosen, _t(-1e6, 0.0), 10.0, 1.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all()
    assert math.isclose(losses[1].item(), 1e7 + 10.0, rel_tol=1e-12)


# ---------------------------------------------------------------- RPO


def test_rpo_is_dpo_plus_length_normalised_nll_on_chosen():
    beta, alpha = 0.1, 1.0
    chosen = _t(-6.0, -10.0).requires_grad_()
    rejected = _t(-8.0, -4.0).requires_grad_()
    ref_chosen, ref_rejected = _t(-7.0, -9.0), _t(-7.0, -5.0)
    counts = torch.tensor([3, 4])
    losses, m = rpo_loss(chosen, rejected, ref_chosen, ref_rejected, counts, beta, alpha)
    # h0 = 1 - (-1) = 2, h1 = -1 - 1 = -2; nll = 6/3 = 2 and 10/4 = 2.5
    expected = [math.log(1 + math.exp(-0.2)) + 2.0, math.log(1 + math.exp(0.2)) + 2.5]
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert m["nll_loss"].tolist() == pytest.approx([2.0, 2.5], rel=1e-12)
    assert m["rewards/margin"].tolist() == pytest.approx([0.2, -0.2], rel=1e-12)
    losses.sum().backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # dL/dchosen = -beta sigmoid(-beta h) - alpha / |y_w|: both terms raise chosen.
    assert chosen.grad.tolist() == pytest.approx([-0.1 * sig(-0.2) - 1 / 3, -0.1 * sig(0.2) - 1 / 4], rel=1e-12)
    assert (rejected.grad > 0).all()


def test_rpo_passes_loss_type_through_and_refuses_ipo():
    x, counts = _t(-2.0), torch.tensor([2])
    losses, _ = rpo_loss(_t(-1.0), _t(-3.0), x, x, counts, 0.5, 0.5, loss_type="hinge")
    # hinge: 1 - 0.5 * 2 = 0; nll = 1/2; alpha 0.5
    assert math.isclose(losses.item(), 0.25, rel_tol=1e-12)
    with pytest.raises(ValueError, match="ipo|IPO"):
        rpo_loss(x, x, x, x, counts, 0.1, 1.0, loss_type="ipo")


def test_cpo_is_a_reference_free_sigmoid_on_sums_plus_per_token_nll_on_chosen():
    # beta 0.5: pair 0 z = 0.5*-2 - 0.5*-4 = 1, pair 1 z = 0.5*-6 - 0.5*-3 = -1.5
    # -log sigmoid(1) = log(1 + e^-1) = 0.3132617; -log sigmoid(-1.5) = log(1 + e^1.5) = 1.7014133
    # NLL on chosen per token: 2 / 4 = 0.5 and 6 / 3 = 2
    chosen, rejected, counts = _t(-2.0, -6.0), _t(-4.0, -3.0), torch.tensor([4, 3])
    losses, metrics = cpo_loss(chosen, rejected, counts, beta=0.5, alpha=1.0)
    assert losses.tolist() == pytest.approx([0.3132617 + 0.5, 1.7014133 + 2.0], abs=1e-6)
    assert metrics["rewards/chosen"].tolist() == [-1.0, -3.0]
    assert metrics["rewards/rejected"].tolist() == [-2.0, -1.5]
    assert metrics["rewards/margin"].tolist() == [1.0, -1.5]
    assert metrics["rewards/accuracy"].tolist() == [1.0, 0.0]
    assert metrics["nll_loss"].tolist() == [0.5, 2.0]
    # alpha = 0 is DPO's sigmoid loss against a reference that scores everything 0
    zero = torch.zeros(2)
    alone, _ = cpo_loss(chosen, rejected, counts, beta=0.5, alpha=0.0)
    assert alone.tolist() == pytest.approx(dpo_loss(chosen, rejected, zero, zero, 0.5)[0].tolist(), abs=1e-7)
    # the NLL term pulls chosen up: d/d chosen_0 = -beta sigmoid(-z) - alpha / |y_w| = -0.5 * 0.2689414 - 0.25
    chosen = chosen.clone().requires_grad_()
    cpo_loss(chosen, rejected, counts, beta=0.5, alpha=1.0)[0].sum().backward()
    assert chosen.grad[0].item() == pytest.approx(-0.5 * 0.2689414 - 0.25, abs=1e-6)
