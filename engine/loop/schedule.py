"""The step clock's arithmetic: which examples each optimizer step sees, and the lr of each step."""

from __future__ import annotations

import math

import torch


class Schedule:
    """Which examples each step sees. A pure function of the step, so resume is exact.

    Each epoch is a seeded permutation of the examples, cut into chunks of `batch_size`; a step
    takes `chunks_per_step` consecutive chunks (the micro-batches of gradient accumulation; an
    online step takes one chunk of prompts).
    """

    def __init__(
        self, n_examples: int, *, batch_size: int, chunks_per_step: int, seed: int, epochs: float, max_steps: int
    ):
        self.n = n_examples
        self.batch_size = batch_size
        self.chunks_per_step = chunks_per_step
        self.seed = seed
        self.chunks_per_epoch = math.ceil(n_examples / batch_size)
        self.steps_per_epoch = math.ceil(self.chunks_per_epoch / chunks_per_step)
        self.total_steps = max_steps or max(1, math.ceil(epochs * self.steps_per_epoch))
        self._order: tuple[int, list[int]] | None = None

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(self.n, generator=generator).tolist())
        return self._order[1]

    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, position = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        first = position * self.chunks_per_step
        last = min(first + self.chunks_per_step, self.chunks_per_epoch)
        return [order[c * self.batch_size : (c + 1) * self.batch_size] for c in range(first, last)]

    def epoch(self, step: int) -> float:
        return step / self.steps_per_epoch


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """The lr multiplier of optimizer step `step` (0-based): linear warmup, then by `kind`

    - linear / cosine: decay to 0 at `total_steps`; constant: 1;
    - inverse_sqrt (the ORPO paper's schedule): sqrt(warmup / s) at the 1-based step s, so 1 at the
      end of the warmup and half of it at 4x the warmup, whatever `total_steps` is. Without warmup it
      decays as if the warmup were one step: 1, 1/sqrt(2), 1/sqrt(3), ...
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind == "inverse_sqrt":
        return math.sqrt(max(1, warmup_steps) / (step + 1))
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


def build_optimizer(spec, parameters: list[torch.nn.Parameter], total_steps: int):
    """AdamW over the trainable parameters and its lr schedule (one scheduler step per loop step)."""
    warmup_steps = spec.warmup_steps or int(spec.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(
        parameters, lr=spec.lr, betas=(spec.adam_beta1, spec.adam_beta2), weight_decay=spec.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, spec.lr_scheduler)
    )
    return optimizer, scheduler
