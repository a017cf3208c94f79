"""GRPO (Shao et al. 2024, arXiv 2402.03300) with the Dr. GRPO and DAPO choices.

Per prompt, G = num_generations samples are scored; each sample's advantage is its reward
normalised within its group, broadcast to all of its tokens:

    A_i = (r_i - mean r) / (std r + 1e-4)          scale_rewards: group (paper) | batch | none (Dr. GRPO)

The per-token loss is PPO's clipped surrogate (ratio against the rollout policy; with
num_iterations = 1 the ratio is 1 but its gradient is the policy gradient), plus beta * k3 KL to
the reference when beta > 0 (beta = 0 loads no reference). Token losses are aggregated by
`loss_type`: grpo (mean per sequence, then over sequences: length-biased), dapo (sum over all
tokens of the mini-batch / its token count) or dr_grpo (sum / (sequences x max_new_tokens)).
Two loss_types also change the policy loss (engine/losses/online.py):

    gspo   GSPO (arXiv 2507.18071): one length-normalised ratio per sequence, clipped per sequence,
           averaged over sequences; clip 3e-4 / 4e-4 when epsilon / epsilon_high are null
    cispo  CISPO (arXiv 2506.13585): detached clipped IS weight x A x log pi per token, token mean;
           no lower bound (epsilon 1) and a weight cap of 5 (epsilon_high 4) when they are null

With num_iterations = 1 and one mini-batch every ratio is 1, so gspo's gradient is grpo's and
cispo's is dapo's; they differ once a rollout is reused (num_iterations or num_mini_batches > 1).

Hyper-parameters (presets/grpo.yaml): num_generations 8 (TRL; paper 64), lr 1e-6, beta 0 (TRL;
paper 0.04), epsilon 0.2, epsilon_high = epsilon (DAPO: 0.28), temperature 1.0, loss_type dapo.
Logged: reward/*, frac_reward_zero_std, advantage/*, policy/clipfrac, policy/clip_{low,high}_frac,
policy/entropy, kl/mean and kl/k3_mean (beta > 0), gen/length_mean, gen/truncated_frac.
"""

from __future__ import annotations

import torch

from engine.algorithms.base import Algorithm, Models
from engine.algorithms.online_rows import (
    collate_rows,
    keep_sample_stats,
    pad_rows,
    policy_ctx,
    rollout_metrics,
    sample_logps,
    sample_row,
    token_logps,
)
from engine.losses.advantages import group_advantages, group_stats, token_kl
from engine.losses.online import (
    GRPO_LOSS_AGGREGATION,
    aggregate_token_loss,
    cispo_policy_loss,
    clipped_policy_loss,
    gspo_policy_loss,
)


class GRPO(Algorithm):
    def __init__(self, spec):
        super().__init__(spec)
        self.needs_reference = spec.beta > 0  # beta = 0: no KL term, no reference model loaded

    def collate(self, rows, pad_id):
        return collate_rows(rows, pad_id, share_prompts=True)

    def prepare(self, rollout, models: Models):
        spec = self.spec
        group = spec.num_generations
        advantages = group_advantages(rollout.rewards, group, scale=spec.scale_rewards)
        metrics = {**rollout_metrics(rollout), **group_stats(rollout.rewards, group)}
        metrics.update(
            {"advantage/mean": advantages.mean().item(), "advantage/std": advantages.std(unbiased=False).item()}
        )
        kept = [i for i, cut in enumerate(rollout.truncated) if not (spec.mask_truncated and cut)]
        rows = [sample_row(rollout, i, advantage=float(advantages[i])) for i in kept]
        olds = refs = None
        if rows and spec.num_iterations > 1:  # later passes need the rollout policy's log-probs for the ratio
            olds = sample_logps(self, policy_ctx(models), rows, models)
            for row, old in zip(rows, olds):
                row["old_logps"] = old
        if rows and self.needs_reference:
            refs = sample_logps(self, models.reference.model, rows, models)
            for row, ref in zip(rows, refs):
                row["ref_logps"] = ref
        advantage = [row["advantage"] for row in rows]
        keep_sample_stats(rollout, kept, advantage=advantage, old_logps=olds, ref_logps=refs)
        return rows, metrics

    @property
    def aggregation(self) -> str:
        return GRPO_LOSS_AGGREGATION[self.spec.loss_type]

    def units(self, batch):
        mask = batch["completion_mask"][:, 1:]
        if self.aggregation == "grpo":
            return float((mask.sum(-1) > 0).sum())
        if self.aggregation == "dr_grpo":
            return float(mask.shape[0] * self.spec.max_new_tokens)
        return float(mask.sum())

    def policy_loss(self, logps, old, advantages, mask):
        """Per-token policy loss [B, T] of the spec's loss_type, and its policy/* metrics."""
        spec = self.spec
        if spec.loss_type == "gspo":
            per_sequence, metrics = gspo_policy_loss(logps, old, advantages, mask, spec.epsilon, spec.epsilon_high)
            # each token carries its sequence's loss: the per-sequence mean ("grpo" aggregation) gives it back
            return per_sequence.unsqueeze(-1).expand_as(logps), metrics
        if spec.loss_type == "cispo":
            return cispo_policy_loss(logps, old, advantages, mask, spec.epsilon, spec.epsilon_high)
        return clipped_policy_loss(logps, old, advantages, mask, spec.epsilon, spec.epsilon_high)

    def loss(self, models, batch, rows):
        spec = self.spec
        logps, mask, out = token_logps(models.policy, batch, spec.temperature, stats=True)
        width = logps.shape[1]
        old = pad_rows(rows, "old_logps", width, logps.device) if "old_logps" in rows[0] else logps.detach()
        advantages = torch.tensor([r["advantage"] for r in rows], dtype=logps.dtype, device=logps.device)
        per_token, metrics = self.policy_loss(logps, old, advantages, mask)
        tokens = float(mask.sum())
        if self.needs_reference:
            ref = pad_rows(rows, "ref_logps", width, logps.device)
            k3 = token_kl(logps, ref, "k3")
            per_token = per_token + spec.beta * k3
            k1_seq = (token_kl(logps.detach(), ref, "k1") * mask).sum(-1)
            k3_seq = (k3.detach() * mask).sum(-1)
            metrics["kl/mean"] = (k1_seq.sum().item(), float(len(rows)))
            metrics["kl/k3_mean"] = (k3_seq.sum().item(), float(len(rows)))
        loss_sum, _ = aggregate_token_loss(
            per_token, mask.to(per_token.dtype), self.aggregation, max_len=spec.max_new_tokens
        )
        metrics["policy/entropy"] = (out.token_entropy.sum().item(), tokens)
        return loss_sum, metrics
