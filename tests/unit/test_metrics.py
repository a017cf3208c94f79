"""Completion metrics shared by the preference methods and KTO, checked by hand."""

from __future__ import annotations

import pytest
import torch

from engine.algorithms.base import completion_metrics
from engine.logprobs import CompletionLogps
from engine.loop.metrics import MetricLog, MetricSums
from engine.reporting import MemoryReporter


def hand_logps() -> CompletionLogps:
    # 4 rows with 2, 1, 3 and 1 completion tokens
    rows = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    return CompletionLogps(
        sums=torch.zeros(4),
        counts=torch.tensor([2, 1, 3, 1]),
        token_logps=torch.zeros(7),
        token_rows=rows,
        token_correct=torch.zeros(7, dtype=torch.bool),
        token_entropy=torch.tensor([0.5, 1.5, 2.0, 1.0, 1.0, 1.0, 3.0]),
        token_logit_mean=torch.tensor([1.0, 3.0, 5.0, -1.0, -2.0, -3.0, 4.0]),
    )


def averaged(metrics) -> dict[str, float]:
    sums = MetricSums()
    sums.add(metrics, units=1)
    return sums.means()


def test_pairs_chosen_rows_first():
    chosen = torch.tensor([True, True, False, False])
    metrics = completion_metrics(hand_logps(), chosen, ~chosen)
    assert metrics == {
        "lengths/chosen": (3.0, 2.0),
        "lengths/rejected": (4.0, 2.0),
        "logits/chosen": (9.0, 3.0),  # 1 + 3 + 5 over 3 chosen tokens
        "logits/rejected": (-2.0, 4.0),  # -1 - 2 - 3 + 4 over 4 rejected tokens
        "policy/entropy": (10.0, 7.0),  # token-weighted over both
    }
    assert averaged(metrics) == pytest.approx(
        {
            "lengths/chosen": 1.5,
            "lengths/rejected": 2.0,
            "logits/chosen": 3.0,
            "logits/rejected": -0.5,
            "policy/entropy": 10 / 7,
        }
    )


def test_rows_in_neither_class_are_left_out_and_an_empty_class_adds_nothing():
    # KTO: rows 2 and 3 are the mismatched pairs for z0; row 0 desirable, row 1 undesirable
    metrics = completion_metrics(
        hand_logps(), torch.tensor([True, False, False, False]), torch.tensor([False, True, False, False])
    )
    assert averaged(metrics) == pytest.approx(
        {
            "lengths/chosen": 2.0,
            "lengths/rejected": 1.0,
            "logits/chosen": 2.0,
            "logits/rejected": 5.0,
            "policy/entropy": 4 / 3,
        }
    )
    none = torch.zeros(4, dtype=torch.bool)
    means = averaged(completion_metrics(hand_logps(), torch.tensor([True, True, True, True]), none))
    assert "lengths/rejected" not in means and "logits/rejected" not in means
    assert means["lengths/chosen"] == pytest.approx(7 / 4)


def test_needs_the_token_stats():
    plain = hand_logps()
    plain.token_entropy = None
    with pytest.raises(ValueError, match="stats=True"):
        completion_metrics(plain, torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool))


def test_the_best_eval_value_is_the_smallest_loss_or_perplexity_and_the_largest_of_the_rest():
    log = MetricLog(MemoryReporter())
    log.emit(1, {"eval/loss": 0.5, "eval/perplexity": 1.6, "eval/exact_match": 0.4, "eval/coh/nll_gap": 0.1})
    log.emit(2, {"eval/loss": 0.7, "eval/perplexity": 2.0, "eval/exact_match": 0.6, "eval/coh/nll_gap": 0.3})
    assert log.best == {"eval/loss": 0.5, "eval/perplexity": 1.6, "eval/exact_match": 0.6, "eval/coh/nll_gap": 0.3}
