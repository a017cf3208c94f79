"""Held-out evaluation with a verifier."""

from __future__ import annotations

from engine.generation import decode_completions, generate
from engine.rewards import exact_match


def exact_match_accuracy(
    model, tokenizer, examples: list[dict], *, max_new_tokens: int = 16, batch_size: int = 64
) -> dict:
    """Greedy completions of `examples` (each with `prompt_ids` and `answer`) scored by exact match.

    Returns `{"accuracy": float, "completions": [str], "correct": [bool]}`.
    """
    ids = generate(
        model,
        tokenizer,
        [ex["prompt_ids"] for ex in examples],
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        batch_size=batch_size,
    )
    completions = decode_completions(tokenizer, ids)
    correct = [exact_match(c, ex["answer"]) == 1.0 for c, ex in zip(completions, examples)]
    accuracy = sum(correct) / len(correct) if correct else 0.0
    return {"accuracy": accuracy, "completions": completions, "correct": correct}
