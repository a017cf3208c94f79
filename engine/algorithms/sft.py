"""Supervised fine-tuning: next-token NLL on completion tokens only (every assistant turn of a conversation).

The loss is a token mean over the whole optimizer step: `units` counts completion tokens, so
gradient accumulation gives the same update as one large batch (docs/algorithms.md, SFT).
Defaults (presets/sft.yaml): lr 2e-5 (TRL, Llama 2), 1-2 epochs; prompt tokens carry no loss.
Logged: token_accuracy, policy/entropy, lengths/completion; eval/perplexity from the token-mean NLL.
Rows of different lengths are packed end to end where the model allows it (engine/packing.py): the
same loss and gradients with no padding in the body, and `batch/pad_fraction` 0.
"""

from __future__ import annotations

import math

import torch

from engine.algorithms.base import Algorithm
from engine.batching import collate_completions, mask_completions
from engine.losses.sft import sft_loss
from engine.packing import full_rows_logps, full_rows_positions


class SFT(Algorithm):
    def collate(self, examples, pad_id):
        return collate_sft(examples, pad_id)

    def units(self, batch):
        return completion_tokens(batch)

    def loss(self, models, batch, rows):
        # Rows of different lengths are packed where the model allows it (no padding in the body).
        out = full_rows_logps(
            models.policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], stats=True
        )
        return sft_loss(out.token_logps), token_metrics(out)

    def body_positions(self, models, batch):
        return full_rows_positions(models.policy, batch["attention_mask"])

    def derived_metrics(self, means):
        return perplexity(means)


def collate_sft(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompt + completion rows, right-padded; a conversation's `loss_mask` keeps only its assistant turns."""
    batch = collate_completions(
        [ex["prompt_ids"] for ex in examples], [ex["completion_ids"] for ex in examples], pad_id
    )
    # a multi-turn conversation: only its assistant turns are taught
    mask_completions(batch, [ex["prompt_ids"] for ex in examples], [ex.get("loss_mask") for ex in examples])
    batch["index"] = torch.tensor([ex["index"] for ex in examples], dtype=torch.long)
    return batch


def completion_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Scored positions: completion tokens that have a token before them to predict from."""
    return int(batch["completion_mask"][:, 1:].sum())


def token_metrics(out) -> dict[str, float | tuple[float, float]]:
    """token_accuracy (per scored token), policy/entropy (nats per token, detached) and
    lengths/completion (scored tokens per row), from `full_rows_logps(..., stats=True)`."""
    tokens = float(out.counts.sum())
    return {
        "token_accuracy": out.token_correct.sum().item(),
        "policy/entropy": (out.token_entropy.sum().item(), tokens),
        "lengths/completion": (tokens, float(out.counts.shape[0])),
    }


def perplexity(means: dict[str, float]) -> dict[str, float]:
    """exp of the token-mean NLL (capped, so a diverged run logs a number, not inf)."""
    return {"perplexity": math.exp(min(means["loss"], 50.0))} if "loss" in means else {}
