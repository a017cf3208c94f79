"""Bradley-Terry reward model: a scalar head on the last token, trained on preference pairs.

loss = -log sigmoid(r(x, y_w) - r(x, y_l) - m) + eta (r_w + r_l)^2, with m an optional per-pair
`margin` column (Llama 2 rating margins) and eta = `center_rewards_coef` (TRL 0.01; 0 = off).
Defaults (presets/rm.yaml): 1 epoch (more overfits), lr 1e-5 (Llama 2) / 9e-6 (InstructGPT),
cosine decay, ties dropped by the data loader. The saved model loads with
AutoModelForSequenceClassification and scores text through `cherry score`.

Eval logs, besides the per-pair means (eval/rewards/{chosen,rejected,margin,accuracy}), the
whole-split statistics of `reward_eval_metrics`: eval/rewards/{mean,std,min,max}, the
correlation of score with completion length (eval/rewards/length_corr) and, with a `margin`
column, the accuracy per margin bucket (eval/rewards/accuracy_margin_<m>).
"""

from __future__ import annotations

import torch

from engine.algorithms.base import Algorithm, metric_sums, pair_samples
from engine.batching import collate_preference
from engine.losses.reward import reward_eval_metrics, reward_model_loss
from engine.models import batch_rewards


class RewardModel(Algorithm):
    rows_per_example = 2  # chosen and rejected share one batch (and, where the model allows, one prompt pass)

    def collate(self, examples, pad_id):
        batch = collate_preference(examples, pad_id)
        margins = [ex.get("margin") for ex in examples]
        batch["margin"] = torch.tensor([0.0 if m is None else m for m in margins])
        return batch

    def loss(self, models, batch, rows):
        rewards = batch_rewards(models.policy, batch)  # each pair's prompt through the body once, where it can
        pairs = self.units(batch)
        losses, metrics = reward_model_loss(
            rewards[:pairs], rewards[pairs:], margin=batch["margin"], center_coef=self.spec.center_rewards_coef
        )
        return losses.sum(), metric_sums(metrics)

    preference_samples = pair_samples  # chosen vs rejected with their scores

    @torch.no_grad()
    def eval_metrics(self, models, examples, collate):
        if not examples:
            return {}
        model, device = models.policy, models.device
        rewards, lengths, margins = [], [], []
        for start in range(0, len(examples), self.spec.eval_rows):
            batch = collate(examples[start : start + self.spec.eval_rows])
            rewards.append(batch_rewards(model, {k: v.to(device) for k, v in batch.items()}).cpu())
            lengths.append(batch["completion_mask"].sum(-1))
            margins.append(batch["margin"])
        pairs = [len(r) // 2 for r in rewards]  # each batch holds its chosen rows, then its rejected rows
        chosen = torch.cat([r[:n] for r, n in zip(rewards, pairs)])
        rejected = torch.cat([r[n:] for r, n in zip(rewards, pairs)])
        chosen_len = torch.cat([length[:n] for length, n in zip(lengths, pairs)])
        rejected_len = torch.cat([length[n:] for length, n in zip(lengths, pairs)])
        has_margin = any(ex.get("margin") is not None for ex in examples)
        return reward_eval_metrics(
            chosen, rejected, chosen_len, rejected_len, torch.cat(margins) if has_margin else None
        )
