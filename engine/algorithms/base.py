"""What every offline algorithm provides to the loop (engine/train.py).

An algorithm names the data kind it trains on, whether it needs the frozen reference, how to
batch examples, what its loss is averaged over (`units`) and the loss itself. The defaults below
are the no-op hooks most algorithms leave alone.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.batching import collate_preference
from engine.logprobs import CompletionLogps, completion_logps
from engine.spec import RunSpec


class Algorithm:
    kind: str = "preference"  # data kind: preference | unpaired | sft | prompt
    needs_reference: bool = True
    rows_per_example: int = 1  # batch rows per example (2 for chosen + rejected)
    generates: bool = True  # a causal LM whose samples can be compared and verified
    model_kind: str = "causal_lm"  # or "reward": a scalar-head sequence classifier

    def __init__(self, spec: RunSpec):
        self.spec = spec

    def prepare_examples(self, examples: list[dict], tokenizer) -> None:
        """Add fields to tokenised examples once, before training (e.g. KTO's mismatched pairs)."""

    def generation_prompt(self, prompt_ids: list[int]) -> list[int]:
        """The prompt the policy is sampled from in evals (Chain of Hindsight appends its positive phrase)."""
        return prompt_ids

    def warnings(self, examples: list[dict]) -> list[str]:
        """Advice about the data or settings, shown when the run starts."""
        return []

    def collate(self, examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """What the loss is averaged over in an optimizer step (pairs, examples or tokens)."""
        return int(batch["index"].numel())

    def loss(self, policy, batch: dict[str, torch.Tensor], ref_logps: torch.Tensor | None):
        """(sum of per-unit losses as a tensor, {metric: sum or (sum, count)}) for one micro-batch."""
        raise NotImplementedError

    def derived_metrics(self, means: dict[str, float]) -> dict[str, float]:
        """Metrics computed from averaged ones (e.g. perplexity from the token-mean NLL)."""
        return {}

    def eval_metrics(self, model, examples: list[dict], collate) -> dict[str, float]:
        """Whole-eval-split metrics that are not means of per-unit values (a reward model's score
        spread, Chain of Hindsight's NLL gap). Called after the eval loss pass, model in eval mode."""
        return {}

    def preference_samples(self, policy, examples: list[dict], collate, ref_logps_fn=None) -> list[dict[str, Any]]:
        """Rows for the samples pane at a sample step, from the first `num_samples` eval examples:
        what the method's own reward says about each pair (or, for unpaired data, each completion).

        `collate` batches examples (CPU tensors); `ref_logps_fn(batch)` gives the reference's
        completion log-prob sums of a batch already on the policy's device (None without a reference).
        Default: nothing (SFT and Chain of Hindsight have no implicit reward)."""
        return []

    def _example_metrics(self, policy, example: dict, collate, ref_logps_fn) -> dict[str, float]:
        """The loss's metrics for one example alone: per-example values, from the same code path
        that trains (each metric's sum over one unit, or its `(sum, count)` divided out)."""
        device = next(policy.parameters()).device
        batch = {k: v.to(device) for k, v in collate([example]).items()}
        ref_logps = ref_logps_fn(batch) if self.needs_reference and ref_logps_fn is not None else None
        _, metrics = self.loss(policy, batch, ref_logps)
        out = {}
        for name, value in metrics.items():
            total, count = value if isinstance(value, tuple) else (value, 1)
            if count:
                out[name] = float(total) / float(count)
        return out


class PreferenceAlgorithm(Algorithm):
    """Methods on chosen/rejected pairs: both completions share one padded batch (one forward pass)."""

    kind = "preference"
    rows_per_example = 2

    def collate(self, examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        return collate_preference(examples, pad_id)

    def policy_logps(self, policy, batch: dict[str, torch.Tensor]) -> tuple[CompletionLogps, int]:
        """Completion log-probs of all rows (chosen first, then rejected) and the number of pairs."""
        out = completion_logps(policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], stats=True)
        return out, self.units(batch)

    @torch.no_grad()
    def preference_samples(self, policy, examples, collate, ref_logps_fn=None):
        """Chosen vs rejected with the method's reward of each, as its loss computes them for
        `rewards/chosen` and `rewards/rejected`: beta (log pi - log ref) summed over the completion
        for DPO and its reference-based variants, beta x mean log-prob for SimPO, lambda x mean
        log-prob for ORPO, the scalar score for a reward model. margin = chosen - rejected."""
        rows = []
        for ex in examples:
            metrics = self._example_metrics(policy, ex, collate, ref_logps_fn)
            if "rewards/chosen" not in metrics or "rewards/rejected" not in metrics:
                continue
            chosen, rejected = metrics["rewards/chosen"], metrics["rewards/rejected"]
            rows.append({
                "kind": "preference", "prompt": ex.get("prompt"), "chosen": ex.get("chosen"), "rejected": ex.get("rejected"),
                "chosen_reward": chosen, "rejected_reward": rejected, "margin": chosen - rejected,
            })
        return rows

    def completion_metrics(self, out: CompletionLogps, pairs: int) -> dict[str, tuple[float, float]]:
        """Lengths, mean logits and entropy of the chosen rows (the first `pairs`) and the rejected rows."""
        chosen = torch.arange(out.sums.shape[0], device=out.sums.device) < pairs
        return completion_metrics(out, chosen, ~chosen)


def completion_metrics(
    out: CompletionLogps, chosen: torch.Tensor, rejected: torch.Tensor
) -> dict[str, tuple[float, float]]:
    """What the policy's completions look like, as `(sum, count)` pairs for the loop to average.

    chosen, rejected: [B] bool masks over the rows of `out` (rows in neither, such as KTO's
    mismatched pairs, are left out). `out` must come from `completion_logps(..., stats=True)`.

    - lengths/chosen, lengths/rejected: completion tokens (incl. EOS) per row;
    - logits/chosen, logits/rejected: the logit averaged over the vocabulary, then over the completion tokens of those rows;
    - policy/entropy: the next-token entropy (nats) averaged over the completion tokens of both.
    A class with no rows in a batch has count 0 there and adds nothing to the average.
    """
    if out.token_entropy is None or out.token_logit_mean is None:
        raise ValueError("completion_metrics needs completion_logps(..., stats=True)")
    counts = out.counts.to(out.token_logit_mean.dtype)
    logit_sums = out.row_sums(out.token_logit_mean)
    entropy_sums = out.row_sums(out.token_entropy)
    both = chosen | rejected
    values = torch.stack(
        [
            counts[chosen].sum(), chosen.sum().to(counts.dtype), counts[rejected].sum(), rejected.sum().to(counts.dtype),
            logit_sums[chosen].sum(), logit_sums[rejected].sum(), entropy_sums[both].sum(), counts[both].sum(),
        ]
    ).tolist()  # one device sync
    chosen_len, n_chosen, rejected_len, n_rejected, chosen_logits, rejected_logits, entropy, tokens = values
    return {
        "lengths/chosen": (chosen_len, n_chosen),
        "lengths/rejected": (rejected_len, n_rejected),
        "logits/chosen": (chosen_logits, chosen_len),
        "logits/rejected": (rejected_logits, rejected_len),
        "policy/entropy": (entropy, tokens),
    }


def metric_sums(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-example metric tensors -> sums for the loop to average."""
    return {name: value.sum().item() for name, value in metrics.items()}
