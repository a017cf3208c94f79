"""KTO (Ethayarajh et al. 2024) on unpaired prompt/completion/label data.

r = log pi(y|x) - log ref(y|x); the reference point z0 = max(0, mean of the same log-ratio on
MISMATCHED prompt/completion pairs), detached; desirable rows gain lambda_D sigma(beta (r - z0)),
undesirable rows lambda_U sigma(beta (z0 - r)). Paired data arrives split into two rows.

Hyper-parameters (presets/kto.yaml): beta 0.1; desirable_weight / undesirable_weight 1.0, chosen
so that lambda_D n_D / (lambda_U n_U) sits in [1, 4/3] (a warning says when it does not);
lr 5e-6 (paper) to 5e-7; per-device batch >= 2 (z0 needs other rows), >= 4 recommended.

Logged: kl (z0), rewards/chosen and rewards/rejected (beta r of desirable
and undesirable rows), rewards/margin, logps/chosen and logps/rejected (sums), count/desirable and
count/undesirable (rows per micro-batch), kto/desirable_fraction, and the completion stats of
every preference method: lengths/*, logits/*, policy/entropy (engine.algorithms.base.completion_metrics).
"""

from __future__ import annotations

import torch

from engine.algorithms.base import Algorithm, completion_metrics, example_metrics
from engine.batching import collate_shared_prompts
from engine.losses.kto import kto_loss, kto_weight_ratio_warning
from engine.shared_prompts import batch_logps, batch_positions


class KTO(Algorithm):
    needs_reference = True
    rows_per_example = 2  # the example, then its mismatched pair for z0

    def prepare_examples(self, examples: list[dict], tokenizer) -> None:
        # Each example's mismatched partner is fixed (a seeded cycle through the data) rather
        # than whatever sits next to it in a batch, so precomputed reference log-probs stay valid.
        if not examples:
            return
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(self.spec.seed)).tolist()
        for position, i in enumerate(order):
            partner = order[(position + 1) % len(order)]
            examples[i]["kl_completion_ids"] = examples[partner]["completion_ids"]

    def warnings(self, examples: list[dict]) -> list[str]:
        desirable = sum(1 for ex in examples if ex["label"])
        message = kto_weight_ratio_warning(
            desirable, len(examples) - desirable, self.spec.desirable_weight, self.spec.undesirable_weight
        )
        return [message] if message else []

    def collate(self, examples, pad_id):
        # The example and its KL row share the prompt: where the model allows, it goes through the body once.
        prompts = [ex["prompt_ids"] for ex in examples]
        batch = collate_shared_prompts(
            prompts + prompts,
            [ex["completion_ids"] for ex in examples] + [ex["kl_completion_ids"] for ex in examples],
            pad_id,
        )
        batch["index"] = torch.tensor([ex["index"] for ex in examples], dtype=torch.long)
        batch["desirable"] = torch.tensor([bool(ex["label"]) for ex in examples])
        return batch

    def body_positions(self, models, batch):
        return batch_positions(models.policy, batch)

    def loss(self, models, batch, rows):
        n, ref_logps = self.units(batch), batch["ref_logps"]
        # z0 is detached: the KL rows are scored without gradient, so none of their activations are kept.
        out = batch_logps(models.policy, batch, stats=True, no_grad_from=n)
        losses, metrics = kto_loss(
            out.sums[:n],
            ref_logps[:n],
            out.sums[n:].detach(),
            ref_logps[n:],
            batch["desirable"],
            self.spec.beta,
            self.spec.desirable_weight,
            self.spec.undesirable_weight,
        )
        desirable = metrics["count/desirable"].sum().item()
        undesirable = n - desirable
        # completion stats of the examples' own rows, not of the mismatched rows behind them
        rows = batch["desirable"].bool().to(out.sums.device)
        mismatched = torch.zeros(out.sums.shape[0] - n, dtype=torch.bool, device=rows.device)
        return losses.sum(), {
            "kl": metrics["kl"].sum().item(),
            "rewards/chosen": (metrics["rewards/desirable_sum"].sum().item(), desirable),
            "rewards/rejected": (metrics["rewards/undesirable_sum"].sum().item(), undesirable),
            "logps/chosen": (metrics["logps/desirable_sum"].sum().item(), desirable),
            "logps/rejected": (metrics["logps/undesirable_sum"].sum().item(), undesirable),
            "kto/desirable_fraction": desirable,
            # rows of each class per micro-batch (averaged over the step's micro-batches)
            "count/desirable": (desirable, 1),
            "count/undesirable": (undesirable, 1),
            "logps/policy": metrics["logps/policy"].sum().item(),
            **completion_metrics(out, torch.cat([rows, mismatched]), torch.cat([~rows, mismatched])),
        }

    @torch.no_grad()
    def preference_samples(self, models, examples, collate, ref_logps_fn=None):
        """Unpaired data has no chosen/rejected pair: each completion with its label (desirable or
        not) and its implicit reward beta (log pi - log ref), as the loss computes it."""
        rows = []
        for ex in examples:
            metrics = example_metrics(self, models, ex, collate, ref_logps_fn)
            name = "rewards/chosen" if ex["label"] else "rewards/rejected"
            if name in metrics:
                rows.append(
                    {
                        "kind": "unpaired",
                        "prompt": ex.get("prompt"),
                        "completion": ex.get("completion"),
                        "label": bool(ex["label"]),
                        "reward": metrics[name],
                    }
                )
        return rows

    def derived_metrics(self, means):
        if "rewards/chosen" in means and "rewards/rejected" in means:
            return {"rewards/margin": means["rewards/chosen"] - means["rewards/rejected"]}
        return {}
