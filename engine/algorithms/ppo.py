"""PPO for RLHF (InstructGPT, arXiv 2203.02155; the N+ implementation details, arXiv 2403.17031).

A value model V estimates, at each completion token, the return from there. Per step:

    r_t   = -kl_coef * (log pi_old(y_t) - log ref(y_t))     on every token (k1 KL penalty)
            + score(x, y)                                    added at the last token (the EOS)
    delta = r_t + gamma V_{t+1} - V_t ;  A_t = sum_l (gamma lam)^l delta_{t+l} ;  G_t = A_t + V_t
    A is whitened over the rollout's tokens; then, for num_iterations epochs of num_mini_batches:
    L = mean_t max(-A rho, -A clip(rho, 1 +- epsilon)) + vf_coef * 0.5 mean_t max((V - G)^2, (clip(V, V_old +- cliprange_value) - G)^2)

kl_coef starts at `beta`; with `kl_target` set it adapts (Ziegler et al. 2019) towards that
sequence KL. The value model starts from `value_model` (a reward model run: InstructGPT's
choice, so early advantages are meaningful) or from the policy's starting weights with a fresh
scalar head. It is a separate model trained by the same optimizer, saved to final_value/.

Hyper-parameters (presets/ppo.yaml, TRL's N+ TL;DR values): lr 3e-6, beta (kl_coef) 0.05,
epsilon 0.2, vf_coef 0.1, cliprange_value 0.2, gamma 1, lam 0.95, num_iterations 4 (PPO epochs),
temperature 0.7, missing_eos_penalty 1.0. Logged: reward/* (scores), kl/mean, reward/non_score,
reward/rlhf, policy/{clipfrac,approx_kl,ratio_mean,entropy}, value/{loss,clipfrac,explained_variance},
advantage/*, ppo/kl_coef.
"""

from __future__ import annotations

import torch

from engine.algorithms.base import Algorithm
from engine.algorithms.online_rows import (
    collate_rows,
    keep_sample_stats,
    pad_rows,
    padded,
    per_row,
    policy_ctx,
    rollout_metrics,
    sample_logps,
    sample_row,
    scored_tokens,
    token_logps,
)
from engine.losses.advantages import AdaptiveKLController, gae, ppo_token_rewards, whiten
from engine.losses.online import clipped_policy_loss, clipped_value_loss, explained_variance
from engine.models import load_reward_model
from engine.rewards.reward_model import resolve_reward_model


class ValueModel(torch.nn.Module):
    """V(x, y_<t) at every completion token: a sequence classifier's scalar head on each position's hidden state."""

    def __init__(self, classifier: torch.nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, T] values of the completion tokens, right-padded; [B, T] mask), aligned with `token_logps`."""
        body = getattr(self.classifier, self.classifier.base_model_prefix)
        hidden = body(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state
        # The state before token t (position t-1) values the choice of y_t, as the policy's log-prob does.
        target_mask = batch["completion_mask"][:, 1:].bool()
        values = self.classifier.score(hidden[:, :-1][target_mask]).squeeze(-1).float()
        return padded(values, target_mask.sum(-1))

    def save_pretrained(self, path) -> None:
        self.classifier.save_pretrained(path)


class PPO(Algorithm):
    def __init__(self, spec):
        super().__init__(spec)
        self.needs_reference = spec.beta > 0  # beta = 0: no KL penalty, no reference model loaded
        self.kl_controller = AdaptiveKLController(spec.beta, spec.kl_target, spec.kl_horizon)

    def build_value_model(self, device, dtype) -> ValueModel:
        source = str(resolve_reward_model(self.spec.value_model)) if self.spec.value_model else self.spec.model
        return ValueModel(
            load_reward_model(source, dtype=dtype, device=device, trust_remote_code=self.spec.trust_remote_code)
        ).train()

    def prepare(self, rollout, models):
        spec = self.spec
        metrics = rollout_metrics(rollout)
        rows = [sample_row(rollout, i) for i in range(len(rollout.completion_ids))]
        old = sample_logps(self, policy_ctx(models), rows, models)
        ref = sample_logps(self, models.reference.model, rows, models) if self.needs_reference else old
        values = per_row(self, rows, models, models.value)
        # per-token values list the policy's tokens only: an episode's GAE runs over its policy tokens, as one
        # sequence (the environment's tokens in between are not actions, and take no discount step)
        lengths = torch.tensor([scored_tokens(r) for r in rows])
        width = int(lengths.max())
        old_p, ref_p, values_p = (pad_rows([{"v": v} for v in vs], "v", width, "cpu") for vs in (old, ref, values))
        mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
        if spec.mask_truncated:
            mask = mask * (~torch.tensor(rollout.truncated))[:, None].float()

        scores = rollout.rewards
        if spec.whiten_rewards:
            scores = whiten(scores, torch.ones_like(scores), shift_mean=False)
        token_rewards, token_kl = ppo_token_rewards(scores, old_p, ref_p, mask, self.kl_controller.value)
        advantages, returns = gae(token_rewards, values_p, mask, spec.gamma, spec.lam)
        advantages = whiten(advantages, mask)
        sequence_kl = (token_kl * mask).sum(-1)
        metrics.update(
            {
                "kl/mean": sequence_kl.mean().item(),
                "reward/non_score": (-self.kl_controller.value * sequence_kl).mean().item(),
                "reward/rlhf": (scores - self.kl_controller.value * sequence_kl).mean().item(),
                "advantage/mean": (advantages * mask).sum().item() / max(mask.sum().item(), 1),
                "returns/mean": (returns * mask).sum().item() / max(mask.sum().item(), 1),
                "value/explained_variance_before": explained_variance(values_p, returns, mask),
            }
        )
        # a sample's advantage in the store: the mean of its tokens' (whitened) advantages, over the tokens trained on
        trained = mask.sum(-1)
        sample_advantage = ((advantages * mask).sum(-1) / trained.clamp(min=1)).tolist()
        keep_sample_stats(
            rollout,
            list(range(len(rows))),
            advantage=[a if t > 0 else None for a, t in zip(sample_advantage, trained.tolist())],
            old_logps=old,
            ref_logps=ref if self.needs_reference else None,
        )
        for i, row in enumerate(rows):
            n = scored_tokens(row)
            row.update(
                old_logps=old[i],
                old_values=values[i],
                advantages=advantages[i, :n],
                returns=returns[i, :n],
                loss_mask=mask[i, :n],
            )
        return [r for r in rows if r["loss_mask"].any()], metrics

    def collate(self, rows, pad_id):
        return collate_rows(rows, pad_id, share_prompts=True)

    def units(self, batch):
        return float(batch["completion_mask"][:, 1:].sum())

    def loss(self, models, batch, rows):
        spec = self.spec
        logps, mask, out = token_logps(models.policy, batch, spec.temperature, stats=True)
        values, _ = models.value(batch)
        width, device = logps.shape[1], logps.device
        old, old_values, advantages, returns, keep = (
            pad_rows(rows, key, width, device)
            for key in ("old_logps", "old_values", "advantages", "returns", "loss_mask")
        )
        keep = keep * mask
        policy_tokens, metrics = clipped_policy_loss(logps, old, advantages, keep, spec.epsilon, spec.epsilon_high)
        value_tokens, value_metrics = clipped_value_loss(values, old_values, returns, keep, spec.cliprange_value)
        metrics.update(value_metrics)
        tokens = float(keep.sum())
        metrics["value/loss"] = ((value_tokens * keep).sum().item(), tokens)
        metrics["policy/loss"] = ((policy_tokens * keep).sum().item(), tokens)
        metrics["value/explained_variance"] = (explained_variance(values.detach(), returns, keep) * tokens, tokens)
        metrics["policy/entropy"] = (out.token_entropy.sum().item(), float(mask.sum()))
        loss_sum = (policy_tokens * keep).sum() + spec.vf_coef * (value_tokens * keep).sum()
        return loss_sum, metrics

    def after_step(self, metrics):
        self.kl_controller.update(metrics.get("kl/mean", 0.0), self.spec.batch_size * self.spec.num_generations)
        return {"ppo/kl_coef": self.kl_controller.value}

    def state_dict(self):
        return {"kl_controller": self.kl_controller.state_dict()}

    def load_state_dict(self, state):
        if "kl_controller" in state:
            self.kl_controller.load_state_dict(state["kl_controller"])
