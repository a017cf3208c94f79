"""SimPO (Meng et al. 2024): reference-free, length-normalised, with a target margin.

loss = -log sigmoid(beta * mean logp(y_w) - beta * mean logp(y_l) - gamma), gamma = gamma_beta_ratio * beta.
Defaults (presets/simpo.yaml): beta 2.0-2.5, gamma_beta_ratio 0.5 (grid 0-1), lr 3e-7 to 1e-6.
No reference model is loaded.
"""

from __future__ import annotations

from engine.algorithms.base import Algorithm, metric_sums, pair_completion_metrics, pair_samples
from engine.batching import collate_preference
from engine.logprobs import completion_logps
from engine.losses.dpo import simpo_loss


class SimPO(Algorithm):
    rows_per_example = 2  # chosen and rejected share one padded batch: one forward pass

    def collate(self, rows, pad_id):
        return collate_preference(rows, pad_id)

    def loss(self, models, batch, rows):
        out = completion_logps(
            models.policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], stats=True
        )
        pairs = self.units(batch)
        means = out.means
        losses, metrics = simpo_loss(
            means[:pairs],
            means[pairs:],
            self.spec.beta,
            self.spec.gamma_beta_ratio,
            label_smoothing=self.spec.label_smoothing,
        )
        return losses.sum(), {**metric_sums(metrics), **pair_completion_metrics(out, pairs)}

    preference_samples = pair_samples  # chosen vs rejected with their implicit rewards
