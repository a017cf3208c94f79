"""Pieces the online algorithms share: a scored rollout's rows, their per-token values and metrics.

The online loop (engine/loop/online.py) samples a rollout and scores it; each online algorithm's
`prepare` turns it into training rows with whatever it needs computed once, without gradients
(old log-probs, reference log-probs, values), using the helpers here. They compute in the same
micro-batches the update will use, so the first update step recomputes exactly the same numbers.
"""

from __future__ import annotations

import contextlib

import torch

from engine.algorithms.base import Models
from engine.batching import collate_completions, collate_shared_prompts, mask_completions
from engine.distributed import World
from engine.episodes import episode_metrics
from engine.logprobs import CompletionLogps
from engine.rollout import Rollout
from engine.shared_prompts import batch_logps


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


def token_logps(
    model, batch: dict[str, torch.Tensor], temperature: float, stats: bool = False
) -> tuple[torch.Tensor, torch.Tensor, CompletionLogps]:
    """Completion-token log-probs of `logits / temperature` as ([B, T], mask [B, T], the flat result).

    A batch whose rows share prompts (`collate_rows(..., share_prompts=True)`) runs each prompt through
    the model once (`engine.shared_prompts.batch_logps`); prepare and the update both come here with the same
    micro-batches, so they still compute exactly the same numbers."""
    out = batch_logps(model, batch, temperature, stats=stats)
    values, mask = padded(out.token_logps, out.counts)
    return values, mask, out


def across_ranks(models: Models, chunks: list[list], score_rows) -> list:
    """`score_rows(rows) -> one result per row` over every row of `chunks` (the update's global
    micro-batches), each rank scoring only its share of each chunk (the rows it will train on in the
    update's first pass), the results gathered back in the rows' order. Every rank calls it with the same
    chunks; a sharded policy's ranks run a filler where their share is empty, as the update does."""
    world = models.world
    mine: list = []
    for chunk in chunks:
        for rows, counts in world.micro_shards([chunk], models.lockstep):
            results = score_rows(rows)
            if counts:
                mine.extend(results)
    if not world.active:
        return mine
    per_rank, taken, out = world.gather(mine), [0] * world.size, []
    for chunk in chunks:
        for rank in range(world.size):
            n = len(World(rank, world.size).shard(chunk))
            out.extend(per_rank[rank][taken[rank] : taken[rank] + n])
            taken[rank] += n
    return out


@torch.no_grad()
def per_row(algo, rows: list[dict], models: Models, score) -> list[torch.Tensor]:
    """`score(batch) -> ([B, T] values, [B, T] mask)` for every row, as one 1-D tensor per row, computed
    in the micro-batches the update will use (so the first update step recomputes exactly the same
    numbers: the PPO ratio starts at exactly 1), each rank scoring its own share (`across_ranks`)."""

    def score_rows(chunk: list[dict]) -> list[torch.Tensor]:
        batch = {k: v.to(models.device) for k, v in algo.collate(chunk, models.tokenizer.pad_token_id).items()}
        values, mask = score(batch)
        values, mask = values.float().cpu(), mask.cpu()  # one copy to the host per micro-batch, not per row
        return [values[i, mask[i]] for i in range(values.shape[0])]

    return across_ranks(models, micro_batches(rows, algo.spec), score_rows)


def sample_logps(algo, model_ctx, rows: list[dict], models: Models) -> list[torch.Tensor]:
    """Per-row completion-token log-probs at the sampling temperature; `model_ctx()` yields the model
    (`models.reference.model`, or `policy_ctx(models)`)."""

    def score(batch):
        with model_ctx() as model:
            return token_logps(model, batch, algo.spec.temperature)[:2]

    return per_row(algo, rows, models, score)


def sample_row(rollout: Rollout, i: int, **values) -> dict:
    """Sample i of a rollout as a training row: its prompt and completion, and for an episode the mask of the
    completion tokens the policy sampled (`policy_mask`), plus `values`."""
    row = {"prompt_ids": rollout.prompt_ids[i], "completion_ids": rollout.completion_ids[i], **values}
    if rollout.episodes is not None:
        row["policy_mask"] = rollout.episodes[i].policy_mask
    return row


def scored_tokens(row: dict) -> int:
    """How many of a row's completion tokens the update scores: the policy's (all of them outside episodes)."""
    mask = row.get("policy_mask")
    return len(row["completion_ids"]) if mask is None else int(sum(mask))


def policy_ctx(models: Models):
    return lambda: contextlib.nullcontext(models.policy)


def collate_rows(rows: list[dict], pad_id: int, share_prompts: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded prompt + completion rows (the completion includes its EOS when it has one); with
    `share_prompts`, each distinct prompt once as well (`collate_shared_prompts`), for `token_logps`. A row
    of an episode carries its `policy_mask`: only the policy's tokens are scored (every per-token value the
    algorithms compute, log-probs, values, advantages, lists the policy's tokens only)."""
    prompts, completions = [r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows]
    loss_masks = [r.get("policy_mask") for r in rows]
    if share_prompts:
        return collate_shared_prompts(prompts, completions, pad_id, loss_masks)
    return mask_completions(collate_completions(prompts, completions, pad_id), prompts, loss_masks)


def micro_batches(rows: list[dict], spec) -> list[list[dict]]:
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
        metrics.update(
            {
                "reward/mean": rewards.mean().item(),
                "reward/std": rewards.std(unbiased=False).item(),
                "reward/min": rewards.min().item(),
                "reward/max": rewards.max().item(),
            }
        )
    for name, values in rollout.components.items():
        scored = [v for v in values if v is not None]  # None: the function gave that sample no reward
        if scored:
            metrics[f"reward/{name}/mean"] = sum(scored) / len(scored)
    metrics.update(episode_metrics(rollout))  # multi-turn: turns, tool calls, tokens/env_fraction
    return metrics


def keep_sample_stats(
    rollout: Rollout,
    indices: list[int],
    *,
    advantage: list[float] | None = None,
    old_logps: list[torch.Tensor] | None = None,
    ref_logps: list[torch.Tensor] | None = None,
) -> None:
    """Leave on the rollout what `prepare` computed per sample, for the rollout store: the values of rows
    `indices` (in the order of the lists given), None for the others and where a list holds None. `old_logps` / `ref_logps` are
    per-row completion-token log-probs under the rollout policy and the reference: their token mean is
    `logp_mean`, the sum of their difference the sample's k1 KL (what RLOO and PPO penalise)."""
    n = len(rollout.completion_ids)

    def spread(values: list) -> list:
        out: list = [None] * n
        for i, value in zip(indices, values):
            out[i] = value
        return out

    if advantage is not None:
        rollout.sample_stats["advantage"] = spread([None if a is None else float(a) for a in advantage])
    if old_logps is not None:
        rollout.sample_stats["logp_mean"] = spread([float(o.mean()) if o.numel() else None for o in old_logps])
        if ref_logps is not None:
            rollout.sample_stats["kl"] = spread([float((o - r).sum()) for o, r in zip(old_logps, ref_logps)])
