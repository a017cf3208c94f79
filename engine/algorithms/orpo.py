"""ORPO (Hong et al. 2024): SFT on chosen plus an odds-ratio penalty on rejected; no reference.

loss = -mean logp(y_w) + lambda * -log sigmoid(log odds(y_w) - log odds(y_l)), odds from the
per-token-mean probability. `beta` holds lambda (0.1 for Mistral-ORPO, 0.2 Llama-2, 0.25 Phi-2),
as in TRL. Trained from a base model: no separate SFT stage, no reference model loaded.
"""

from __future__ import annotations

from engine.algorithms.base import Algorithm, metric_sums, pair_completion_metrics, pair_samples
from engine.batching import collate_preference
from engine.logprobs import completion_logps
from engine.losses.orpo import orpo_loss


class ORPO(Algorithm):
    rows_per_example = 2  # chosen and rejected share one padded batch: one forward pass

    def collate(self, rows, pad_id):
        return collate_preference(rows, pad_id)

    def loss(self, models, batch, rows):
        out = completion_logps(
            models.policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], stats=True
        )
        pairs = self.units(batch)
        means = out.means
        losses, metrics = orpo_loss(means[:pairs], means[pairs:], self.spec.beta)
        return losses.sum(), {**metric_sums(metrics), **pair_completion_metrics(out, pairs)}

    preference_samples = pair_samples  # chosen vs rejected with their implicit rewards
