"""Reward sources that score a completion without a model (verifiers)."""

from __future__ import annotations


def exact_match(completion: str, answer: str) -> float:
    """Verifier reward: 1.0 when the completion equals the gold answer after stripping
    surrounding whitespace on both, else 0.0."""
    return 1.0 if completion.strip() == answer.strip() else 0.0
