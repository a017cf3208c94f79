"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, arXiv 2402.14740).

A whole completion is one action. With k = num_generations samples per prompt, the KL to the
reference is folded into each sample's reward, without gradient (k1 summed over its tokens):

    R_i = r(x, y_i) - beta * sum_t [log pi_old(y_it) - log ref(y_it)]
    A_i = R_i - mean_{j != i} R_j                    (the other samples of the same prompt)
    loss = -(1/k) sum_i A_i * log pi(y_i | x)        (summed token log-probs)

With num_iterations > 1 the sequence-level clipped ratio exp(log pi - log pi_old) replaces the
plain log-prob (the paper finds the clip rarely active: stay close to on-policy).

Hyper-parameters (presets/rloo.yaml): num_generations 4 (paper: 4 beats 2; TRL 2), beta 0.05 (TRL),
lr 1e-6, temperature 1.0, epsilon 0.2. Logged: reward/*, kl/mean, reward/rlhf (R), advantage/*,
frac_reward_zero_std, policy/entropy, gen/length_mean, gen/truncated_frac, policy/clipfrac.
"""

from __future__ import annotations

import torch

from engine.algorithms.base import Algorithm
from engine.algorithms.online_rows import (
    collate_rows,
    keep_sample_stats,
    policy_ctx,
    rollout_metrics,
    sample_logps,
    sample_row,
    token_logps,
)
from engine.losses.advantages import group_stats, rloo_advantages
from engine.losses.online import sequence_policy_loss


class RLOO(Algorithm):
    def __init__(self, spec):
        super().__init__(spec)
        self.needs_reference = spec.beta > 0  # beta = 0: no KL in the reward, no reference model loaded

    def collate(self, rows, pad_id):
        return collate_rows(rows, pad_id, share_prompts=True)

    def prepare(self, rollout, models):
        spec = self.spec
        metrics = {**rollout_metrics(rollout), **group_stats(rollout.rewards, spec.num_generations)}
        rows = [sample_row(rollout, i) for i in range(len(rollout.completion_ids))]
        rewards = rollout.rewards.clone()
        # The rollout policy's log-probs enter the KL penalty (beta > 0) and the clipped ratio of later
        # passes (num_iterations > 1). Otherwise the loss is -A log pi, whose ratio against the rollout
        # policy is exactly 1 in the one pass (as in GRPO): no extra forward pass over the samples.
        needs_old = self.needs_reference or spec.num_iterations > 1
        olds = refs = None
        if needs_old:
            olds = sample_logps(self, policy_ctx(models), rows, models)
            old_sums = torch.stack([o.sum() for o in olds])
        if self.needs_reference:
            refs = sample_logps(self, models.reference.model, rows, models)
            ref_sums = torch.stack([r.sum() for r in refs])
            kl = old_sums - ref_sums
            rewards = rewards - spec.beta * kl
            metrics.update({"kl/mean": kl.mean().item(), "reward/non_score": (-spec.beta * kl).mean().item()})
        metrics["reward/rlhf"] = rewards.mean().item()
        advantages = rloo_advantages(rewards, spec.num_generations)
        metrics.update(
            {"advantage/mean": advantages.mean().item(), "advantage/std": advantages.std(unbiased=False).item()}
        )
        for i, (row, a) in enumerate(zip(rows, advantages.tolist())):
            row.update(advantage=a, **({"old_logp": float(old_sums[i])} if needs_old else {}))
        trained = [not (spec.mask_truncated and cut) for cut in rollout.truncated]
        keep_sample_stats(
            rollout,
            list(range(len(rows))),
            advantage=[row["advantage"] if train else None for row, train in zip(rows, trained)],
            old_logps=olds,
            ref_logps=refs,
        )
        return [row for row, train in zip(rows, trained) if train], metrics

    def loss(self, models, batch, rows):
        logps, mask, out = token_logps(models.policy, batch, self.spec.temperature, stats=True)
        seq_logps = (logps * mask).sum(-1)
        as_tensor = lambda key: torch.tensor([r[key] for r in rows], dtype=seq_logps.dtype, device=seq_logps.device)  # noqa: E731
        clip = self.spec.epsilon if self.spec.num_iterations > 1 else None
        old = as_tensor("old_logp") if "old_logp" in rows[0] else seq_logps.detach()
        losses, metrics = sequence_policy_loss(seq_logps, old, as_tensor("advantage"), clip)
        metrics["policy/entropy"] = (out.token_entropy.sum().item(), float(mask.sum()))
        return losses.sum(), metrics
