"""DPO as the offline loop sees it: which data it needs, how to batch it, and its loss.

Hyper-parameters (presets/dpo.yaml): beta (0.1; KL strength, 0.5 on TL;DR in the paper),
label_smoothing (0 = DPO; > 0 = cDPO for noisy labels), lr (1e-6 full fine-tune in the paper).
"""

from __future__ import annotations

import torch

from engine.batching import collate_preference
from engine.logprobs import completion_logps
from engine.losses.dpo import dpo_loss
from engine.spec import RunSpec


class DPO:
    kind = "preference"  # the data kind it trains on (see engine.data.KIND_OF_FORMAT)
    needs_reference = True
    rows_per_example = 2  # chosen and rejected share one padded batch: one forward pass

    def __init__(self, spec: RunSpec):
        self.beta = spec.beta
        self.label_smoothing = spec.label_smoothing

    def collate(self, examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        return collate_preference(examples, pad_id)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """What the loss is averaged over: pairs."""
        return int(batch["index"].numel())

    def loss(
        self, policy: torch.nn.Module, batch: dict[str, torch.Tensor], ref_logps: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(sum of per-pair losses, sums of per-pair metrics) for one micro-batch."""
        out = completion_logps(policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        pairs = self.units(batch)
        losses, metrics = dpo_loss(
            out.sums[:pairs], out.sums[pairs:], ref_logps[:pairs], ref_logps[pairs:], self.beta, self.label_smoothing
        )
        return losses.sum(), {name: value.sum().item() for name, value in metrics.items()}


