"""ORPO (Hong et al. 2024): SFT on chosen plus an odds-ratio penalty on rejected; no reference.

loss = -mean logp(y_w) + lambda * -log sigmoid(log odds(y_w) - log odds(y_l)), odds from the
per-token-mean probability. `beta` holds lambda (0.1 for Mistral-ORPO, 0.2 Llama-2, 0.25 Phi-2),
as in TRL. Trained from a base model: no separate SFT stage, no reference model loaded.
"""

from __future__ import annotations

from engine.algorithms.base import Algorithm
from engine.algorithms.dpo import _metric_sums
from engine.batching import collate_preference
from engine.logprobs import completion_logps
from engine.losses.orpo import orpo_loss


class ORPO(Algorithm):
    kind = "preference"
    needs_reference = False
    rows_per_example = 2

    def collate(self, examples, pad_id):
        return collate_preference(examples, pad_id)

    def loss(self, policy, batch, ref_logps):
        out = completion_logps(policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        pairs = self.units(batch)
        means = out.means
        losses, metrics = orpo_loss(means[:pairs], means[pairs:], self.spec.beta)
        return losses.sum(), _metric_sums(metrics)
