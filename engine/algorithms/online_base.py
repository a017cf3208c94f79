"""What every online algorithm provides to the online loop (engine/online.py).

Each step the loop samples a rollout (k completions per prompt) and scores it; the algorithm
then turns the scored rollout into training rows (`prepare`: advantages, preference pairs or
kept samples, with whatever it needs computed once without gradients: old log-probs, reference
log-probs, values), says how those rows are trained on (`phases`), and gives the loss of a
padded batch of rows (`loss`, a sum over `units`, like the offline algorithms).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from engine.batching import collate_completions
from engine.logprobs import CompletionLogps, completion_logps
from engine.rollout import Rollout
from engine.spec import RunSpec


@dataclass
class OnlineModels:
    """What an algorithm may use: the trained policy (and value model), the frozen reference, the judge."""

    policy: torch.nn.Module
    tokenizer: object
    device: torch.device
    reference: object | None = None  # engine.reference.Reference
    value: torch.nn.Module | None = None  # PPO's value model (trained with the policy)
    judge: object | None = None  # online DPO's pairwise judge


@dataclass
class Phase:
    """Rows trained on for `passes` passes (each pass: `num_mini_batches` optimizer steps)."""

    rows: list[dict]
    passes: float
    metrics: dict[str, float] = field(default_factory=dict)
    mini_batches: int | None = None  # optimizer steps per pass; None = spec.num_mini_batches


def padded(values: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat per-token values (rows one after another) -> ([B, T] right-padded with 0, [B, T] bool mask)."""
    width = int(counts.max()) if counts.numel() else 0
    mask = torch.arange(width, device=counts.device)[None, :] < counts[:, None]
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    out[mask] = values
    return out, mask


def pad_rows(rows: list[dict], key: str, width: int, device) -> torch.Tensor:
    """Per-row 1-D tensors (one value per completion token) -> [B, width], zero-padded."""
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    for i, row in enumerate(rows):
        values = row[key]
        out[i, : values.shape[0]] = values
    return out.to(device)


def token_logps(model, batch: dict[str, torch.Tensor], temperature: float, stats: bool = False) -> tuple[torch.Tensor, torch.Tensor, CompletionLogps]:
    """Completion-token log-probs of `logits / temperature` as ([B, T], mask [B, T], the flat result)."""
    out = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], temperature, stats=stats)
    values, mask = padded(out.token_logps, out.counts)
    return values, mask, out


class OnlineAlgorithm:
    kind = "prompt"  # data kind: prompts (+ optional answers)
    model_kind = "causal_lm"
    generates = True
    rows_per_example = 1
    uses_value_model = False
    uses_judge = False

    def __init__(self, spec: RunSpec):
        self.spec = spec

    @property
    def needs_reference(self) -> bool:
        """A KL term needs the frozen reference; with beta = 0 none is loaded (no memory, no forward)."""
        return self.spec.beta > 0

    @property
    def group_size(self) -> int:
        return self.spec.num_generations

    def prepare(self, rollout: Rollout, models: OnlineModels) -> tuple[list[dict], dict[str, float]]:
        """Scored rollout -> (training rows, metrics of this rollout)."""
        raise NotImplementedError

    def phases(self, rows: list[dict]) -> list[Phase]:
        """How the rows are trained on; most methods: all of them, `num_iterations` passes."""
        return [Phase(rows, self.spec.num_iterations)]

    def collate(self, rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """Right-padded prompt + completion rows (the completion includes its EOS when it has one)."""
        return collate_completions([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows], pad_id)

    def units(self, batch: dict[str, torch.Tensor]) -> float:
        """What the loss is averaged over across a mini-batch's micro-batches (default: sequences)."""
        return float(batch["input_ids"].shape[0])

    def loss(self, models: OnlineModels, batch: dict[str, torch.Tensor], rows: list[dict]):
        """(loss sum as a tensor, {metric: sum or (sum, count)}) for one micro-batch."""
        raise NotImplementedError

    def after_rollout(self, metrics: dict[str, float]) -> dict[str, float]:
        """Adjust state after a step (PPO's adaptive KL); returns metrics to log."""
        return {}

    def summary(self) -> dict:
        """Run-level figures for summary.json (online DPO: its judge's preferences); most methods: none."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ------------------------------------------------------------------ shared pieces

    @torch.no_grad()
    def per_row(self, rows: list[dict], models: OnlineModels, score) -> list[torch.Tensor]:
        """`score(batch) -> ([B, T] values, [B, T] mask)` for every row, as one 1-D tensor per row, computed
        in the micro-batches the update will use (so the first update step recomputes exactly the same
        numbers: the PPO ratio starts at exactly 1)."""
        out: list[torch.Tensor] = []
        for chunk in micro_batches(rows, self.spec):
            batch = {k: v.to(models.device) for k, v in self.collate(chunk, models.tokenizer.pad_token_id).items()}
            values, mask = score(batch)
            out.extend(values[i, mask[i]].float().cpu() for i in range(values.shape[0]))
        return out

    def sample_logps(self, model_ctx, rows: list[dict], models: OnlineModels) -> list[torch.Tensor]:
        """Per-row completion-token log-probs at the sampling temperature; `model_ctx()` yields the model
        (`models.reference.model`, or `self.policy_ctx(models)`)."""

        def score(batch):
            with model_ctx() as model:
                return token_logps(model, batch, self.spec.temperature)[:2]

        return self.per_row(rows, models, score)

    @staticmethod
    def policy_ctx(models: OnlineModels):
        return lambda: contextlib.nullcontext(models.policy)


def micro_batches(rows: list[dict], spec: RunSpec) -> list[list[dict]]:
    """The update's mini-batches split into micro-batches, in order: the partition the first pass uses."""
    out = []
    for mini in split(rows, spec.num_mini_batches):
        out.extend(split(mini, spec.grad_accum))
    return out


def split(rows: list, parts: int) -> list[list]:
    """`rows` cut into `parts` contiguous, near-equal, non-empty chunks (fewer when there are fewer rows)."""
    parts = max(1, min(parts, len(rows)))
    size, extra = divmod(len(rows), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(rows[start:end])
        start = end
    return [chunk for chunk in out if chunk]


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    """What every online method logs about its samples: rewards, lengths, truncation."""
    lengths = torch.tensor(rollout.lengths, dtype=torch.float32)
    truncated = torch.tensor(rollout.truncated)
    metrics = {
        "gen/length_mean": lengths.mean().item(),
        "gen/truncated_frac": truncated.float().mean().item(),
        "gen/seconds": rollout.seconds,
        "gen/samples_per_s": len(rollout.completion_ids) / max(rollout.seconds, 1e-9),
        "gen/tokens_per_s": float(lengths.sum()) / max(rollout.seconds, 1e-9),
    }
    if (~truncated).any():
        metrics["gen/length_terminated_mean"] = lengths[~truncated].mean().item()
    rewards = rollout.rewards
    if rewards is not None:  # None: online DPO judged by an LLM alone, with no reward source that fits the data
        metrics.update({"reward/mean": rewards.mean().item(), "reward/std": rewards.std(unbiased=False).item(),
                        "reward/min": rewards.min().item(), "reward/max": rewards.max().item()})
    for name, values in rollout.components.items():
        metrics[f"reward/{name}/mean"] = sum(values) / len(values)
    return metrics
