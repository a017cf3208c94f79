"""The one contract every algorithm meets, offline or online.

The loops (engine/loop/offline.py, engine/loop/online.py) ask an algorithm for three things:

- `collate(rows, pad_id)`: a padded batch of training rows (examples of the dataset offline; rows
  made from a scored rollout online);
- `units(batch)`: what the loss is averaged over in an optimizer step (pairs, examples, sequences
  or tokens), so that accumulating micro-batches equals one big batch;
- `loss(models, batch, rows)`: (the sum of per-unit losses as a tensor, {metric: sum or (sum, count)}).

An online algorithm also turns each scored rollout into rows (`prepare`) and says how they are
trained on (`phases`). Everything else below is an optional hook with a no-op default. What an
algorithm *is* (its data kind, online or not, its loss types, charts and form fields) is its row
in engine/registry.py, not an attribute here; the class says how it trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.distributed import GradientSync, World
from engine.logprobs import CompletionLogps


@dataclass
class Models:
    """What an algorithm may use: the trained policy (and value model), the frozen reference, the judge."""

    policy: torch.nn.Module
    tokenizer: Any
    device: torch.device
    reference: Any = None  # engine.reference.Reference, when the algorithm needs one
    value: torch.nn.Module | None = None  # PPO's value model (trained with the policy)
    judge: Any = None  # online DPO's LLM judge (engine.rewards)
    world: World = field(default_factory=World)  # the run's processes: prepare splits its scoring over them
    lockstep: bool = False  # a sharded policy: every rank runs the same passes (`World.micro_shards`)
    gradient_sync: GradientSync | None = None  # sums what trains over the ranks, overlapped with backward


@dataclass
class Phase:
    """Rows trained on for `passes` passes (each pass: `num_mini_batches` optimizer steps)."""

    rows: list[dict]
    passes: float
    metrics: dict[str, float] = field(default_factory=dict)
    mini_batches: int | None = None  # optimizer steps per pass; None = spec.num_mini_batches


class Algorithm:
    # Whether the frozen reference model is loaded; its log-probs reach the loss as batch["ref_logps"]
    # (offline) or in the rows (online). Methods with an optional KL term set it from beta.
    needs_reference: bool = False
    # Batch rows per training row (2: chosen + rejected, or KTO's example + its mismatched pair).
    rows_per_example: int = 1

    def __init__(self, spec):
        self.spec = spec

    # ------------------------------------------------------------------ the contract

    def collate(self, rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def units(self, batch: dict[str, torch.Tensor]) -> float:
        """Default: training rows (pairs for pair methods, sequences for online methods)."""
        return batch["input_ids"].shape[0] // self.rows_per_example

    def loss(self, models: Models, batch: dict[str, torch.Tensor], rows: list[dict]):
        """(sum of per-unit losses as a tensor, {metric: sum or (sum, count)}) for one micro-batch."""
        raise NotImplementedError

    def body_positions(self, models: Models, batch: dict[str, torch.Tensor]) -> int:
        """Positions the policy's body runs over for `batch` (the denominator of `batch/pad_fraction`).
        Default: every position of its padded rows; methods that pack rows say how many remain."""
        return batch["attention_mask"].numel()

    # ------------------------------------------------------------------ online methods

    def prepare(self, rollout, models: Models) -> tuple[list[dict], dict[str, float]]:
        """A scored rollout -> (training rows, metrics of this rollout)."""
        raise NotImplementedError(f"{type(self).__name__} trains on a fixed dataset, not on rollouts")

    def phases(self, rows: list[dict]) -> list[Phase]:
        """How a rollout's rows are trained on; most methods: all of them, `num_iterations` passes."""
        return [Phase(rows, self.spec.num_iterations)]

    def build_value_model(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module | None:
        """A model trained beside the policy (PPO's value model); None for most methods."""
        return None

    def llm_judge(self) -> str | None:
        """A causal LM that judges pairs of samples (online DPO's `judge`), or None."""
        return None

    # ------------------------------------------------------------------ optional hooks

    def prepare_examples(self, examples: list[dict], tokenizer) -> None:
        """Add fields to tokenised examples once, before training (e.g. KTO's mismatched pairs)."""

    def warnings(self, examples: list[dict]) -> list[str]:
        """Advice about the data or settings, shown when the run starts."""
        return []

    def generation_prompt(self, prompt_ids: list[int]) -> list[int]:
        """The prompt the policy is sampled from in evals (Chain of Hindsight appends its positive phrase)."""
        return prompt_ids

    def derived_metrics(self, means: dict[str, float]) -> dict[str, float]:
        """Metrics computed from averaged ones (e.g. perplexity from the token-mean NLL)."""
        return {}

    def after_step(self, metrics: dict[str, float]) -> dict[str, float]:
        """Adjust state after a step (PPO's adaptive KL coefficient); returns metrics to log."""
        return {}

    def eval_metrics(self, models: Models, examples: list[dict], collate) -> dict[str, float]:
        """Whole-eval-split metrics that are not means of per-unit values (a reward model's score
        spread, Chain of Hindsight's NLL gap). Called after the eval loss pass, model in eval mode."""
        return {}

    def preference_samples(
        self, models: Models, examples: list[dict], collate, ref_logps_fn=None
    ) -> list[dict[str, Any]]:
        """Rows for the samples pane at a sample step, from the first `num_samples` eval examples:
        what the method's own reward says about each pair (or, for unpaired data, each completion).
        Default: nothing (SFT and Chain of Hindsight have no implicit reward)."""
        return []

    def summary(self) -> dict:
        """Run-level figures for summary.json (online DPO: its judge's preferences); most methods: none."""
        return {}

    def state_dict(self) -> dict:
        """State to keep in checkpoints (PPO's KL coefficient, online DPO's judge tallies)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# ----------------------------------------------------------------------------- shared pieces


def example_metrics(algo: Algorithm, models: Models, example: dict, collate, ref_logps_fn) -> dict[str, float]:
    """The loss's metrics for one example alone: per-example values, from the same code path that
    trains (each metric's sum over one unit, or its `(sum, count)` divided out)."""
    batch = {k: v.to(models.device) for k, v in collate([example]).items()}
    if algo.needs_reference and ref_logps_fn is not None:
        batch["ref_logps"] = ref_logps_fn(batch)
    _, metrics = algo.loss(models, batch, [example])
    out = {}
    for name, value in metrics.items():
        total, count = value if isinstance(value, tuple) else (value, 1)
        if count:
            out[name] = float(total) / float(count)
    return out


@torch.no_grad()
def pair_samples(algo: Algorithm, models: Models, examples: list[dict], collate, ref_logps_fn=None) -> list[dict]:
    """Chosen vs rejected with the method's reward of each, as its loss computes them for
    `rewards/chosen` and `rewards/rejected`: beta (log pi - log ref) summed over the completion
    for DPO and its reference-based variants, beta x mean log-prob for SimPO, lambda x mean
    log-prob for ORPO, the scalar score for a reward model. margin = chosen - rejected."""
    rows = []
    for ex in examples:
        metrics = example_metrics(algo, models, ex, collate, ref_logps_fn)
        if "rewards/chosen" not in metrics or "rewards/rejected" not in metrics:
            continue
        chosen, rejected = metrics["rewards/chosen"], metrics["rewards/rejected"]
        rows.append(
            {
                "kind": "preference",
                "prompt": ex.get("prompt"),
                "chosen": ex.get("chosen"),
                "rejected": ex.get("rejected"),
                "chosen_reward": chosen,
                "rejected_reward": rejected,
                "margin": chosen - rejected,
            }
        )
    return rows


def pair_completion_metrics(out: CompletionLogps, pairs: int) -> dict[str, tuple[float, float]]:
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
            counts[chosen].sum(),
            chosen.sum().to(counts.dtype),
            counts[rejected].sum(),
            rejected.sum().to(counts.dtype),
            logit_sums[chosen].sum(),
            logit_sums[rejected].sum(),
            entropy_sums[both].sum(),
            counts[both].sum(),
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
