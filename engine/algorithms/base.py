"""What every offline algorithm provides to the loop (engine/train.py).

An algorithm names the data kind it trains on, whether it needs the frozen reference, how to
batch examples, what its loss is averaged over (`units`) and the loss itself. The defaults below
are the no-op hooks most algorithms leave alone.
"""

from __future__ import annotations

import torch

from engine.spec import RunSpec


class Algorithm:
    kind: str = "preference"  # data kind: preference | unpaired | sft | prompt
    needs_reference: bool = True
    rows_per_example: int = 1  # batch rows per example (2 for chosen + rejected)
    generates: bool = True  # a causal LM whose samples can be compared and verified
    model_kind: str = "causal_lm"  # or "reward": a scalar-head sequence classifier

    def __init__(self, spec: RunSpec):
        self.spec = spec

    def prepare_examples(self, examples: list[dict]) -> None:
        """Add fields to tokenised examples once, before training (e.g. KTO's mismatched pairs)."""

    def warnings(self, examples: list[dict]) -> list[str]:
        """Advice about the data or settings, shown when the run starts."""
        return []

    def collate(self, examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """What the loss is averaged over in an optimizer step (pairs, examples or tokens)."""
        return int(batch["index"].numel())

    def loss(self, policy, batch: dict[str, torch.Tensor], ref_logps: torch.Tensor | None):
        """(sum of per-unit losses as a tensor, {metric: sum or (sum, count)}) for one micro-batch."""
        raise NotImplementedError

    def derived_metrics(self, means: dict[str, float]) -> dict[str, float]:
        """Metrics computed from averaged ones (e.g. perplexity from the token-mean NLL)."""
        return {}
