"""Rejection sampling fine-tuning (best-of-K; Llama 2 arXiv 2307.09288, RAFT) and ReST (Gulcehre et al. 2023, arXiv 2308.08998).

Both grow a dataset from the policy's own samples and improve by plain SFT (the token-mean NLL
of engine/losses/sft.py) on the samples the reward ranks highest; no reference model.

Best-of-K, each step: K = num_generations samples per prompt; the best one of each prompt is
kept (groups whose samples all score the same are skipped: there is nothing to select), and the
policy trains on the kept samples for num_iterations passes. Its analytic KL to the sampling
policy, log K - (K-1)/K, is logged as bon/kl so it sits on the same reward-vs-KL plot.

ReST, each step is one Grow + Improve round: Grow samples num_generations per prompt of the
step's batch; Improve runs one SFT phase per entry of rest_keep_fractions (default 0.5, 0.3, 0.1),
each keeping the samples with reward >= tau_i where tau_i is the quantile that keeps that top
fraction, and each continuing from the previous phase. A sample with the pool's lowest reward is
never kept, so with a binary verifier ReST keeps exactly the correct samples (as ReST-EM does).

Hyper-parameters (presets/best_of_k.yaml, rest.yaml): K 8 (Llama 2 sampled up to 10s per
prompt), temperature 1.0 (Llama 2 found ~1.2-1.3 best for RLHF-tuned models: re-tune per round),
lr as SFT, rest_improve_epochs 1 per phase. Logged: reward/* of the pool, reward/group_max_mean,
reward/max_median_gap, bon/kl, gen/selected_length vs gen/length_mean; ReST: rest/threshold_i,
rest/kept_frac_i, rest/kept_reward_mean_i.
"""

from __future__ import annotations

import torch

from engine.algorithms.base import Algorithm, Models, Phase
from engine.algorithms.online_rows import collate_rows, rollout_metrics, sample_row
from engine.algorithms.sft import completion_tokens
from engine.logprobs import completion_logps
from engine.losses.advantages import best_of_k_indices, bon_kl, group_stats, quantile_threshold, rest_keep_mask
from engine.losses.sft import sft_loss


def self_training_loss(models: Models, batch: dict[str, torch.Tensor]):
    """SFT on selected samples: the summed NLL of their completion tokens (the loop divides by the
    mini-batch's completion tokens: a token mean), with token accuracy and entropy."""
    out = completion_logps(
        models.policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], stats=True
    )
    tokens = float(out.counts.sum())
    return sft_loss(out.token_logps), {
        "token_accuracy": out.token_correct.sum().item(),
        "policy/entropy": (out.token_entropy.sum().item(), tokens),
    }


class BestOfK(Algorithm):
    def collate(self, rows, pad_id):
        return collate_rows(rows, pad_id)

    def units(self, batch):
        return float(completion_tokens(batch))

    def loss(self, models, batch, rows):
        return self_training_loss(models, batch)

    def prepare(self, rollout, models):
        k = self.spec.num_generations
        rewards = rollout.rewards
        metrics = {**rollout_metrics(rollout), **group_stats(rewards, k), "bon/kl": bon_kl(k)}
        groups = rewards.view(-1, k)
        informative = (groups.max(-1).values > groups.min(-1).values).tolist()
        best = best_of_k_indices(rewards, k).tolist()
        rows = [sample_row(rollout, i, reward=rewards[i].item()) for i, keep in zip(best, informative) if keep]
        metrics["bon/selected_frac"] = len(rows) / len(best)
        if rows:
            metrics["gen/selected_length"] = sum(len(r["completion_ids"]) for r in rows) / len(rows)
            metrics["bon/selected_reward_mean"] = sum(r["reward"] for r in rows) / len(rows)
        return rows, metrics


class ReST(Algorithm):
    def collate(self, rows, pad_id):
        return collate_rows(rows, pad_id)

    def units(self, batch):
        return float(completion_tokens(batch))

    def loss(self, models, batch, rows):
        return self_training_loss(models, batch)

    def prepare(self, rollout, models):
        metrics = {**rollout_metrics(rollout), **group_stats(rollout.rewards, self.spec.num_generations)}
        rows = [sample_row(rollout, i, reward=r) for i, r in enumerate(rollout.rewards.tolist())]
        return rows, metrics

    def phases(self, rows):
        rewards = torch.tensor([r["reward"] for r in rows])
        lowest = rewards.min()
        phases = []
        for i, fraction in enumerate(self.spec.rest_keep_fractions or [0.5, 0.3, 0.1], start=1):
            threshold = quantile_threshold(rewards, fraction)
            keep = rest_keep_mask(rewards, threshold) & (rewards > lowest)
            kept = [row for row, k in zip(rows, keep.tolist()) if k]
            metrics = {
                f"rest/threshold_{i}": float(threshold),
                f"rest/kept_frac_{i}": len(kept) / len(rows),
            }
            if kept:
                metrics[f"rest/kept_reward_mean_{i}"] = float(rewards[keep].mean())
            phases.append(Phase(kept, self.spec.rest_improve_epochs, metrics))
        return phases
