"""The step clock's arithmetic: which examples each optimizer step sees, and the lr of each step."""

from __future__ import annotations

import math

import torch

# Length grouping sorts rows within mega-batches of this many micro-batches (the usual factor: big
# enough that neighbours have similar lengths, small enough that the order stays random).
GROUP_MEGA_BATCHES = 50


class Schedule:
    """Which examples each step sees. A pure function of the step, so resume is exact.

    Each epoch is a seeded permutation of the examples, cut into chunks of `batch_size`; a step
    takes `chunks_per_step` consecutive chunks (the micro-batches of gradient accumulation; an
    online step takes one chunk of prompts).

    With `lengths` (one per example: its padded width's driver, e.g. prompt + longest completion),
    the permutation is cut into mega-batches of `GROUP_MEGA_BATCHES` chunks, each sorted by length
    so a chunk holds rows of similar length (less padding), and the full chunks are then shuffled
    (same seed) so the step order does not run from long to short. Still a function of
    (seed, epoch), so resume stays exact.
    """

    def __init__(
        self,
        n_examples: int,
        *,
        batch_size: int,
        chunks_per_step: int,
        seed: int,
        epochs: float,
        max_steps: int,
        lengths: list[int] | None = None,
    ):
        self.n = n_examples
        self.batch_size = batch_size
        self.chunks_per_step = chunks_per_step
        self.seed = seed
        self.lengths = lengths
        self.chunks_per_epoch = math.ceil(n_examples / batch_size)
        self.steps_per_epoch = math.ceil(self.chunks_per_epoch / chunks_per_step)
        self.total_steps = max_steps or max(1, math.ceil(epochs * self.steps_per_epoch))
        self._chunks: tuple[int, list[list[int]]] | None = None

    def _epoch_chunks(self, epoch: int) -> list[list[int]]:
        if self._chunks is None or self._chunks[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n, generator=generator).tolist()
            if self.lengths is not None:
                order = self._grouped(order)
            chunks = [order[start : start + self.batch_size] for start in range(0, self.n, self.batch_size)]
            if self.lengths is not None:
                # Shuffle the full chunks; a short last chunk stays last, as without grouping.
                full = len(chunks) - (self.n % self.batch_size != 0)
                chunks = [chunks[i] for i in torch.randperm(full, generator=generator).tolist()] + chunks[full:]
            self._chunks = (epoch, chunks)
        return self._chunks[1]

    def _grouped(self, order: list[int]) -> list[int]:
        """The permutation with each mega-batch sorted longest first (ties keep the random order)."""
        lengths = self.lengths or []
        mega = self.batch_size * GROUP_MEGA_BATCHES
        out: list[int] = []
        for start in range(0, len(order), mega):
            out += sorted(order[start : start + mega], key=lambda i: -lengths[i])
        return out

    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, position = divmod(step, self.steps_per_epoch)
        chunks = self._epoch_chunks(epoch)
        first = position * self.chunks_per_step
        return chunks[first : min(first + self.chunks_per_step, self.chunks_per_epoch)]

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
    # On GPUs the fused kernel: one pass per parameter, without the parameter-sized temporaries of the
    # multi-tensor path (a peak of up to 4 more bytes per parameter at the optimizer step). The CPU keeps
    # the default per-parameter loop (its results are the ones the recorded demo runs hold).
    on_gpu = bool(parameters) and all(p.device.type == "cuda" for p in parameters)
    optimizer = torch.optim.AdamW(
        parameters,
        lr=spec.lr,
        betas=(spec.adam_beta1, spec.adam_beta2),
        weight_decay=spec.weight_decay,
        fused=True if on_gpu else None,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, spec.lr_scheduler)
    )
    return optimizer, scheduler
