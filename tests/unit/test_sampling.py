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


def test_top_k_and_min_p_keep_only_the_likely_tokens():
    from engine.rollout import truncate

    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top2 = truncate(scores, top_k=2)
    assert torch.isfinite(top2).tolist() == [[True, True, False, False]]
    # min_p 0.2: keep tokens with p >= 0.2 * 0.5 = 0.1
    assert torch.isfinite(truncate(scores, min_p=0.2)).tolist() == [[True, True, True, False]]
    assert torch.equal(truncate(scores), scores)
    generator = torch.Generator().manual_seed(0)
    draws = sample_next(scores.expand(4000, -1), 1.0, generator=generator, top_k=2)
    counts = torch.bincount(draws, minlength=4).tolist()
    assert counts[2] == counts[3] == 0 and abs(counts[0] / 4000 - 0.5 / 0.8) < 0.03


def test_repetition_penalty_follows_ctrl():
    from engine.rollout import penalise_repeats

    logits = torch.tensor([[2.0, -1.0, 3.0]])
    seen = torch.tensor([[True, True, False]])
    assert penalise_repeats(logits, seen, 2.0).tolist() == [[1.0, -2.0, 3.0]]
    assert torch.equal(penalise_repeats(logits, seen, 1.0), logits)


def test_a_sample_ends_at_a_stop_string_and_keeps_it(tiny_model_dir):
    from engine.models import load_causal_lm, load_tokenizer
    from engine.rollout import sample_rollout

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
    examples = [{"prompt_ids": tokenizer("ab")["input_ids"], "prompt": "ab"}]
    torch.manual_seed(0)
    free = sample_rollout(model, tokenizer, examples, k=16, max_new_tokens=12, temperature=1.0)
    # a stop string that some free samples hold: each first character that appears after the first token
    stop = next(t[1] for t in free.texts if len(t) > 2 and t[1].strip())
    torch.manual_seed(0)
    stopped = sample_rollout(model, tokenizer, examples, k=16, max_new_tokens=12, temperature=1.0, stop=[stop])
    held = [i for i, t in enumerate(stopped.texts) if stop in t]
    assert held
    for i in held:
        text = stopped.texts[i]
        assert text.index(stop) + len(stop) == len(text) and not stopped.truncated[i]  # ends at the stop, kept
