"""What every pair method shares: chosen and rejected in one batch scored together, a pair loss.

DPO (and its loss types), SimPO, CPO and ORPO differ only in the function of the pair's log-probs
they minimise; each subclass gives that as `pair_loss`, and this class does the rest: collate,
the policy's completion log-probs with the statistics every preference method logs (each pair's
prompt through the body once for both its rows where the model allows it: engine/shared_prompts.py),
the split into chosen and rejected halves, and the metrics.
"""

from __future__ import annotations

import torch

from engine.algorithms.base import Algorithm, metric_sums, pair_completion_metrics, pair_samples
from engine.batching import collate_preference
from engine.logprobs import CompletionLogps
from engine.shared_prompts import batch_logps, batch_positions


class PairMethod(Algorithm):
    rows_per_example = 2  # chosen and rejected share one batch (and, where the model allows, one prompt pass)

    def collate(self, rows, pad_id):
        return collate_preference(rows, pad_id)

    def loss(self, models, batch, rows):
        out = batch_logps(models.policy, batch, stats=True)
        pairs = self.units(batch)
        losses, metrics = self.pair_loss(out, pairs, batch)
        return losses.sum(), {**metric_sums(metrics), **pair_completion_metrics(out, pairs)}

    def body_positions(self, models, batch):
        return batch_positions(models.policy, batch)

    def pair_loss(
        self, out: CompletionLogps, pairs: int, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(per-pair losses, per-pair metrics) from the policy's log-probs: rows [:pairs] are the chosen
        completions, [pairs:] the rejected ones (`out.sums`, `out.means`, `out.counts`)."""
        raise NotImplementedError

    preference_samples = pair_samples  # chosen vs rejected with their implicit rewards
