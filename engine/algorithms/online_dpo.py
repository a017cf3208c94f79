"""Online DPO with AI feedback (OAIF; Guo et al. 2024, arXiv 2402.04792).

Each step samples two completions per prompt from the CURRENT policy (num_generations = 2, no
gradient through sampling), asks a judge which is better, and applies the DPO (or IPO) loss to
the pair, with the frozen starting model as the reference:

    p(A > B) = sigmoid(r_A - r_B) from the rollout's rewards (judge: reward), or an LLM judge asked
               in both orders (a sample without EOS then loses when missing_eos_penalty > 0)
    pairs with |p - 0.5| < judge_tie_margin are skipped (near-ties carry no preference)
    loss = dpo_loss(log pi(y_w) - log ref(y_w), log pi(y_l) - log ref(y_l))      (engine/losses/dpo.py)

Log-probs of policy and reference use the sampling temperature. Hyper-parameters
(presets/online_dpo.yaml): beta 0.1, lr 5e-7 (TRL), temperature 0.9, max_new_tokens 64,
missing_eos_penalty 1.0, judge "reward" or a causal LM dir, judge_template (the LLM judge's prompt;
None = the built-in one). Logged: the DPO metrics (rewards/*, logps/*, lengths/*, policy/entropy),
judge/skip_frac, judge/prob_mean, judge/shorter_preferred_frac (decided pairs of unequal length won by
the shorter sample), judge/position_consistency (LLM judge: both orders agree), judge/reward_agreement
(LLM judge: decided pairs of unequal reward won by the higher reward), reward/* of the samples. The
run summary's "judge" block holds the same rates over the whole run, with the template that produced them.
"""

from __future__ import annotations

import torch

from engine.algorithms.base import Algorithm, completion_metrics, metric_sums
from engine.algorithms.online_rows import across_ranks, micro_batches, rollout_metrics
from engine.batching import collate_completions, mask_completions
from engine.logprobs import completion_logps
from engine.losses.dpo import dpo_loss
from engine.rewards.judge import judge_pairs, judge_tallies


def both_orders(a_first: list[float], b_first: list[float]) -> list[list[dict]]:
    """Per sample (rows 2g and 2g + 1 are pair g's A and B), the LLM judge's verdict in each presentation
    order: the position it was shown at (1 or 2) and the judge's probability that it is the better one."""
    out = []
    for p_a_first, p_b_first in zip(a_first, b_first):
        out.append([{"shown": 1, "p_better": p_a_first}, {"shown": 2, "p_better": 1.0 - p_b_first}])
        out.append([{"shown": 1, "p_better": p_b_first}, {"shown": 2, "p_better": 1.0 - p_a_first}])
    return out


class OnlineDPO(Algorithm):
    needs_reference = True  # DPO's implicit reward is a log-ratio to the reference
    rows_per_example = 2

    def __init__(self, spec):
        super().__init__(spec)
        self.judge_totals: dict[str, list[int]] = {}  # engine.rewards.judge_tallies summed over the run

    def llm_judge(self):
        return None if self.spec.judge == "reward" else self.spec.judge

    def prepare(self, rollout, models):
        spec = self.spec
        metrics = rollout_metrics(rollout)
        a, b = slice(0, None, 2), slice(1, None, 2)  # the two samples of prompt g are rows 2g and 2g + 1
        consistent = None  # both presentation orders agree, per pair (LLM judge only)
        if models.judge is None:
            # judge = reward: Bradley-Terry on the rollout's rewards (already scored, missing_eos_penalty included).
            prob_a = torch.sigmoid(rollout.rewards[a] - rollout.rewards[b]).tolist()
        else:
            columns = {name: values[a] for name, values in rollout.columns().items()}
            verdict = models.judge.prefer(
                rollout.prompts[a],
                rollout.texts[a],
                rollout.texts[b],
                rollout.prompt_ids[a],
                rollout.completion_ids[a],
                rollout.completion_ids[b],
                columns,
            )
            prob_a, consistent = verdict.prob_a, verdict.consistent
            if verdict.a_first is not None and verdict.b_first is not None:
                rollout.sample_stats["judge"] = both_orders(verdict.a_first, verdict.b_first)
            if spec.missing_eos_penalty > 0:  # a sample that never ended loses to one that did, whatever the judge says
                cut_a, cut_b = rollout.truncated[a], rollout.truncated[b]
                prob_a = [
                    0.0 if ca and not cb else 1.0 if cb and not ca else p for p, ca, cb in zip(prob_a, cut_a, cut_b)
                ]
        winners, skip = judge_pairs(prob_a, spec.judge_tie_margin)
        metrics["judge/skip_frac"] = sum(skip) / len(skip)
        metrics["judge/prob_mean"] = sum(max(p, 1 - p) for p in prob_a) / len(prob_a)
        rewards = rollout.rewards.tolist() if consistent is not None and rollout.rewards is not None else None
        lengths = rollout.lengths
        tallies = judge_tallies(
            winners,
            skip,
            lengths[a],
            lengths[b],
            consistent,
            rewards[a] if rewards else None,
            rewards[b] if rewards else None,
        )
        for name, (count, out_of) in tallies.items():
            total = self.judge_totals.setdefault(name, [0, 0])
            total[0], total[1] = total[0] + count, total[1] + out_of
            if out_of and name != "decided_frac":  # judge/skip_frac already says how many were decided
                metrics[f"judge/{name}"] = count / out_of
        pairs = []
        chosen: list[bool | None] = [None] * len(rollout.completion_ids)  # for the rollout store
        for g, (winner, skipped) in enumerate(zip(winners, skip)):
            if skipped:
                continue
            rows = (2 * g, 2 * g + 1) if winner == 0 else (2 * g + 1, 2 * g)
            chosen[rows[0]], chosen[rows[1]] = True, False
            pair = {
                "prompt_ids": rollout.prompt_ids[2 * g],
                "chosen_ids": rollout.completion_ids[rows[0]],
                "rejected_ids": rollout.completion_ids[rows[1]],
            }
            if rollout.episodes is not None:  # whole episodes: their policy tokens are scored, the environment's not
                pair["chosen_mask"] = rollout.episodes[rows[0]].policy_mask
                pair["rejected_mask"] = rollout.episodes[rows[1]].policy_mask
            pairs.append(pair)
        rollout.sample_stats["chosen"] = chosen
        if pairs:
            self._reference_logps(pairs, models)
        return pairs, metrics

    def summary(self) -> dict:
        """The judge's preferences over the whole run, next to the template that produced them."""
        rates = {name: count / out_of if out_of else None for name, (count, out_of) in self.judge_totals.items()}
        pairs = self.judge_totals.get("decided_frac", [0, 0])[1]
        return {
            "judge": {"judge": self.spec.judge, "judge_template": self.spec.judge_template, "pairs": pairs, **rates}
        }

    def state_dict(self) -> dict:
        return {"judge_totals": {k: list(v) for k, v in self.judge_totals.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.judge_totals = {k: list(v) for k, v in state.get("judge_totals", {}).items()}

    @torch.no_grad()
    def _reference_logps(self, pairs, models):
        def score_pairs(chunk):
            batch = {k: v.to(models.device) for k, v in self.collate(chunk, models.tokenizer.pad_token_id).items()}
            with models.reference.model() as ref:
                sums = completion_logps(
                    ref, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], self.spec.temperature
                ).sums.tolist()  # one host sync per micro-batch
            n = len(chunk)
            return [(sums[i], sums[n + i]) for i in range(n)]

        for pair, (chosen, rejected) in zip(pairs, across_ranks(models, micro_batches(pairs, self.spec), score_pairs)):
            pair["ref_chosen"], pair["ref_rejected"] = chosen, rejected

    def collate(self, rows, pad_id):
        prompts = [r["prompt_ids"] for r in rows]
        batch = collate_completions(
            prompts + prompts, [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows], pad_id
        )
        masks = [r.get("chosen_mask") for r in rows] + [r.get("rejected_mask") for r in rows]
        return mask_completions(batch, prompts + prompts, masks)

    def loss(self, models, batch, rows):
        spec = self.spec
        out = completion_logps(
            models.policy,
            batch["input_ids"],
            batch["attention_mask"],
            batch["completion_mask"],
            spec.temperature,
            stats=True,
        )
        n = len(rows)
        ref = torch.tensor(
            [[r["ref_chosen"], r["ref_rejected"]] for r in rows], dtype=out.sums.dtype, device=out.sums.device
        )
        ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
        scores = out.sums
        if spec.loss_type == "ipo":  # IPO compares per-token means (engine/losses/dpo.py)
            counts = out.counts.clamp(min=1).to(scores.dtype)
            scores, ref_chosen, ref_rejected = out.means, ref_chosen / counts[:n], ref_rejected / counts[n:]
        losses, metrics = dpo_loss(
            scores[:n], scores[n:], ref_chosen, ref_rejected, spec.beta, loss_type=spec.loss_type
        )
        chosen = torch.arange(2 * n, device=scores.device) < n
        return losses.sum(), {**metric_sums(metrics), **completion_metrics(out, chosen, ~chosen)}
