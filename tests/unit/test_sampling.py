"""The rollout's sampler draws from softmax(logits / temperature) within the top-p nucleus: frequency
(chi-square) checks on small fixed distributions with a seeded generator, and the nucleus against
transformers' own top-p rule."""

from __future__ import annotations

import pytest
import torch

from engine.rollout import nucleus, sample_next

DRAWS = 60_000
# Chi-square critical values at p = 0.001: a correct sampler fails one of these checks 1 time in 1000
# (the seeds are fixed, so a passing check passes every time).
CRITICAL = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}


def _frequencies(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tokens = sample_next(logits.expand(DRAWS, -1), temperature, top_p, generator=generator)
    return torch.bincount(tokens, minlength=logits.shape[-1]).double()


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """(statistic, degrees of freedom) over the tokens with probability > 0; a token outside them must never be drawn."""
    support = probs > 0
    assert counts[~support].sum() == 0, "a token with probability 0 was drawn"
    expected = probs[support].double() * counts.sum()
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


LOGITS = torch.tensor([[1.5, 0.2, -0.7, 2.1, float("-inf"), -2.5]])


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_frequencies_follow_the_tempered_softmax(temperature):
    counts = _frequencies(LOGITS, temperature)
    statistic, dof = _chi_square(counts, (LOGITS[0] / temperature).softmax(-1))
    assert statistic < CRITICAL[dof]


def test_a_wrong_distribution_fails_the_same_check():
    """The check can fail: draws at temperature 1 are rejected against the temperature-0.8 distribution."""
    statistic, dof = _chi_square(_frequencies(LOGITS), (LOGITS[0] / 0.8).softmax(-1))
    assert statistic > 10 * CRITICAL[dof]


def test_top_p_keeps_the_smallest_nucleus_and_renormalises_it():
    probs = torch.tensor([0.1, 0.45, 0.05, 0.3, 0.1])
    logits = probs.log()[None]
    # 0.45 + 0.3 = 0.75 >= 0.7: tokens 1 and 3 form the nucleus, drawn 0.6 / 0.4
    counts = _frequencies(logits, top_p=0.7, seed=1)
    expected = torch.tensor([0.0, 0.45, 0.0, 0.3, 0.0]) / 0.75
    statistic, dof = _chi_square(counts, expected)
    assert statistic < CRITICAL[dof]
    # a nucleus smaller than the most likely token still keeps it
    assert torch.equal(_frequencies(logits, top_p=0.01, seed=2).nonzero().flatten(), torch.tensor([1]))


def test_nucleus_matches_transformers_top_p_rule():
    from transformers.generation.logits_process import TopPLogitsWarper

    scores = torch.randn(16, 300, generator=torch.Generator().manual_seed(0)) * 3
    for top_p in (0.3, 0.9, 0.99):
        ours = nucleus(scores, top_p)
        theirs = TopPLogitsWarper(top_p)(None, scores.clone())
        assert torch.equal(ours.isinf(), theirs.isinf())
    assert torch.equal(nucleus(scores, 1.0), scores)


def test_mass_at_either_end_of_a_large_vocabulary_is_found():
    """The CDF search lands on the only token with weight, first or last, in a 151,936-token vocabulary."""
    logits = torch.full((2, 151_936), float("-inf"))
    logits[0, 0] = 0.0
    logits[1, -1] = 0.0
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample_next(logits, 1.0, generator=generator).tolist() == [0, 151_935]


def test_rows_draw_independently_and_a_seed_repeats_them():
    logits = torch.zeros(4096, 8)
    first = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(5))
    again = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    counts = torch.bincount(first, minlength=8).double()
    statistic, dof = _chi_square(counts, torch.full((8,), 1 / 8))
    assert statistic < 24.32  # 7 degrees of freedom, p = 0.001
