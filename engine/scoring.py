"""Score text with a trained reward model: an earlier Cherry RM run or a local classifier dir."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from engine.batching import collate_completions
from engine.errors import CherryError
from engine.models import _load_error, disable_dropout, load_tokenizer, pick_device, sequence_rewards


def resolve_reward_model(source: str) -> Path | str:
    """A run directory means its final/ weights; anything else is a model dir or hub id."""
    path = Path(source).expanduser()
    if (path / "final").is_dir():
        return path / "final"
    if path.exists():
        return path
    if source.startswith((".", "/", "~")):
        raise CherryError(f"--reward-model {source}: no such run directory or model directory")
    return source


def load_reward_source(source: str, device: str = "auto"):
    """(model, tokenizer) for scoring; a LoRA reward adapter is loaded onto its base."""
    from transformers import AutoModelForSequenceClassification

    resolved = resolve_reward_model(source)
    target = pick_device(device)
    tokenizer = load_tokenizer(str(resolved))
    try:
        if isinstance(resolved, Path) and (resolved / "adapter_config.json").exists():
            from peft import AutoPeftModelForSequenceClassification

            model = AutoPeftModelForSequenceClassification.from_pretrained(resolved, num_labels=1)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(resolved, num_labels=1)
    except Exception as err:
        raise _load_error("a reward model", str(resolved), err) from None
    disable_dropout(model)
    return model.to(target).eval(), tokenizer


@torch.no_grad()
def score_completions(model, tokenizer, prompts: list[list[int]], completions: list[list[int]], batch_size: int = 16) -> list[float]:
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(prompts), batch_size):
        batch = collate_completions(prompts[start : start + batch_size], completions[start : start + batch_size], tokenizer.pad_token_id)
        scores.extend(sequence_rewards(model, batch["input_ids"].to(device), batch["attention_mask"].to(device)).tolist())
    return scores


def helpful_safety_scores(
    helpful: list[float], safety: list[float], is_safety_prompt: list[bool], threshold: float = 0.15
) -> list[float]:
    """Llama 2's combined reward over a set of scored rows: the safety RM's score where the prompt is
    safety-tagged or that score is below `threshold`, else the helpfulness score (both as sigmoid
    probabilities), then whitened logits (engine.losses.reward)."""
    from engine.losses.reward import combine_helpful_safety, logit_whiten

    combined = combine_helpful_safety(
        torch.sigmoid(torch.tensor(helpful, dtype=torch.float64)), torch.sigmoid(torch.tensor(safety, dtype=torch.float64)),
        torch.tensor(is_safety_prompt), threshold,
    )
    return logit_whiten(combined).tolist()


def reward_scorer(model, tokenizer, batch_size: int = 16, safety_model=None, safety_threshold: float = 0.15):
    """A function (prompts, completions, safety tags) -> scores: one RM, or the helpful + safety pair."""

    def score(prompts: list[list[int]], completions: list[list[int]], tags: list[bool]) -> list[float]:
        helpful = score_completions(model, tokenizer, prompts, completions, batch_size)
        if safety_model is None:
            return helpful
        safety = score_completions(safety_model, tokenizer, prompts, completions, batch_size)
        return helpful_safety_scores(helpful, safety, tags, safety_threshold)

    return score


def score_dataset(data, score) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per-row scores and a summary. Preference rows give pairwise accuracy and margin."""
    rows = data.train + data.eval
    prompts = [ex["prompt_ids"] for ex in rows]
    tags = [bool(ex.get("safety")) for ex in rows]
    if data.kind == "preference":
        # Chosen and rejected are scored as one set: the combined reward whitens over all of them.
        both = score(prompts + prompts, [ex["chosen_ids"] for ex in rows] + [ex["rejected_ids"] for ex in rows], tags + tags)
        chosen, rejected = both[: len(rows)], both[len(rows) :]
        scored = [{"prompt": ex["prompt"], "chosen": ex["chosen"], "rejected": ex["rejected"], "chosen_score": c,
                   "rejected_score": r} for ex, c, r in zip(rows, chosen, rejected)]
        margins = [c - r for c, r in zip(chosen, rejected)]
        summary = {"pairs": len(rows), "accuracy": sum(m > 0 for m in margins) / len(margins),
                   "margin_mean": sum(margins) / len(margins), **_stats(chosen + rejected)}
        return scored, summary
    scores = score(prompts, [ex["completion_ids"] for ex in rows], tags)
    scored = [{"prompt": ex["prompt"], "completion": ex["completion"], "score": s} for ex, s in zip(rows, scores)]
    return scored, {"rows": len(rows), **_stats(scores)}


def _stats(values: list[float]) -> dict[str, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {"score_mean": mean, "score_std": std, "score_min": min(values), "score_max": max(values)}
