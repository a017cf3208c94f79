"""Bradley-Terry reward model: a scalar head on the last token, trained on preference pairs.

loss = -log sigmoid(r(x, y_w) - r(x, y_l) - m) + eta (r_w + r_l)^2, with m an optional per-pair
`margin` column (Llama 2 rating margins) and eta = `center_rewards_coef` (TRL 0.01; 0 = off).
Defaults (presets/rm.yaml): 1 epoch (more overfits), lr 1e-5 (Llama 2) / 9e-6 (InstructGPT),
cosine decay, ties dropped by the data loader. The saved model loads with
AutoModelForSequenceClassification and scores text through `cherry score`.
"""

from __future__ import annotations

import torch

from engine.algorithms.base import PreferenceAlgorithm, metric_sums
from engine.losses.reward import reward_model_loss
from engine.models import sequence_rewards


class RewardModel(PreferenceAlgorithm):
    needs_reference = False
    generates = False  # a scorer, not a generator: no samples, no exact match
    model_kind = "reward"

    def collate(self, examples, pad_id):
        batch = super().collate(examples, pad_id)
        margins = [ex.get("margin") for ex in examples]
        batch["margin"] = torch.tensor([0.0 if m is None else m for m in margins])
        return batch

    def loss(self, model, batch, ref_logps):
        rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
        pairs = self.units(batch)
        losses, metrics = reward_model_loss(
            rewards[:pairs], rewards[pairs:], margin=batch["margin"], center_coef=self.spec.center_rewards_coef
        )
        return losses.sum(), metric_sums(metrics)
