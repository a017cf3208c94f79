"""ORPO loss and its log-odds helpers against values computed by hand."""

import math

import pytest
import torch

from engine.losses.orpo import log1mexp, log_odds, orpo_loss


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def _log_odds(m):
    """log(P / (1 - P)), P = e^m, the plain way (fine for moderate m)."""
    p = math.exp(m)
    return math.log(p / (1 - p))


def test_orpo_matches_hand_computed_values():
    lam = 0.1
    c, r = (-0.2, -0.9), (-1.5, -0.4)
    losses, m = orpo_loss(_t(*c), _t(*r), lam)
    for i in range(2):
        ratio = _log_odds(c[i]) - _log_odds(r[i])
        or_loss = math.log(1 + math.exp(-ratio))
        assert math.isclose(losses[i].item(), -c[i] + lam * or_loss, rel_tol=1e-12)
        assert math.isclose(m["or_loss"][i].item(), or_loss, rel_tol=1e-12)
        assert math.isclose(m["log_odds_ratio"][i].item(), ratio, rel_tol=1e-12)
        assert math.isclose(m["log_odds_chosen"][i].item(), _log_odds(c[i]), rel_tol=1e-12)
        assert math.isclose(m["log_odds_rejected"][i].item(), _log_odds(r[i]), rel_tol=1e-12)
    assert m["nll_loss"].tolist() == [0.2, 0.9]
    assert m["rewards/chosen"].tolist() == pytest.approx([-0.02, -0.09], rel=1e-12)
    assert m["rewards/rejected"].tolist() == pytest.approx([-0.15, -0.04], rel=1e-12)
    assert m["rewards/margin"].tolist() == pytest.approx([0.13, -0.05], rel=1e-12)
    assert m["rewards/accuracy"].tolist() == [1.0, 0.0]
    assert m["logps/chosen"].tolist() == [-0.2, -0.9]
    assert m["logps/rejected"].tolist() == [-1.5, -0.4]


def test_orpo_with_zero_lambda_is_the_chosen_nll():
    losses, _ = orpo_loss(_t(-0.7), _t(-0.1), 0.0)
    assert losses.item() == 0.7


@pytest.mark.parametrize("x", [-1e-12, -1e-5, -0.3, -0.69, -0.7, -2.0, -30.0, -800.0])
def test_log1mexp_matches_hand_values_on_both_branches(x):
    # log(1 - e^x) = log(-x) + log((1 - e^x) / -x); for |x| small use the series 1 + x/2 + x^2/6
    if x > -1e-3:
        want = math.log(-x) + math.log1p(x / 2 + x * x / 6)
    elif x > -10:
        want = math.log(1 - math.exp(x))
    else:
        want = -math.exp(x) - math.exp(2 * x) / 2  # log(1 - u) = -u - u^2/2 - ..., u = e^x
    got = log1mexp(_t(x)).item()
    assert math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-300)


def test_log_odds_near_zero_stays_finite_and_exact():
    # m = -1e-9: 1 - e^m = 1e-9 (1 - 5e-10 + ...), so log odds = m - log(1e-9) - log1p(-5e-10 + 1.7e-19)
    m = -1e-9
    want = m - math.log(1e-9) - math.log1p(-5e-10 + 1e-18 / 6)
    assert math.isclose(log_odds(_t(m)).item(), want, rel_tol=1e-12)
    chosen = _t(m).requires_grad_()
    rejected = _t(-0.5).requires_grad_()
    losses, metrics = orpo_loss(chosen, rejected, 0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_orpo_is_finite_at_the_extremes(dtype):
    # m = 0 exactly (certain prediction), -1e-9, moderate, and hugely negative means.
    chosen = torch.tensor([0.0, -1e-9, -0.5, -6e4], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([-6e4, 0.0, -1e-9, -0.0], dtype=dtype, requires_grad=True)
    losses, metrics = orpo_loss(chosen, rejected, 0.25)
    assert losses.dtype in (torch.float32, torch.float64)  # computed in fp32 at least
    losses.sum().backward()
    assert torch.isfinite(losses).all()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())


def test_orpo_gradient_raises_chosen_and_lowers_rejected():
    lam = 0.2
    chosen = _t(-0.6).requires_grad_()
    rejected = _t(-0.4).requires_grad_()
    losses, _ = orpo_loss(chosen, rejected, lam)
    losses.sum().backward()
    # d log odds / dm = 1 / (1 - e^m), so
    # dL/dc = -1 - lam sigmoid(-ratio) / (1 - e^c) and dL/dr = lam sigmoid(-ratio) / (1 - e^r)
    ratio = _log_odds(-0.6) - _log_odds(-0.4)
    s = 1 / (1 + math.exp(ratio))
    assert math.isclose(chosen.grad.item(), -1 - lam * s / (1 - math.exp(-0.6)), rel_tol=1e-12)
    assert math.isclose(rejected.grad.item(), lam * s / (1 - math.exp(-0.4)), rel_tol=1e-12)
    assert chosen.grad.item() < 0 < rejected.grad.item()


def test_orpo_rejects_negative_lambda():
    with pytest.raises(ValueError, match="lambda"):
        orpo_loss(_t(-1.0), _t(-1.0), -0.1)
