"""NaN and inf: refused in a model's weights at load, caught in a run before they reach its weights.

A run checks each optimizer step's loss (already on the host: the loop reads it for its metrics)
and gradient norm (already computed for clipping), and each online step's rewards and advantages
(on the host after `prepare`), so the check adds no host sync of its own on one process. A
non-finite value raises `NonFiniteError` before the optimizer steps: the weights stay finite, and
the loop core then skips the step (`skip_nonfinite_steps`) or ends the run as failed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from typing import TYPE_CHECKING, Iterable

from engine.errors import CherryError, SpecError

if TYPE_CHECKING:  # engine.spec reads `check_nonfinite_settings` and stays torch-free
    import torch

log = logging.getLogger("cherry.engine")


class NonFiniteError(CherryError):
    """A loss, gradient norm, reward, advantage or weight is NaN or infinite."""


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, float] | None:
    """The first floating-point tensor holding a NaN or an inf, with one such value; None when all are finite.

    Each tensor's min and max (NaN propagates through both) are reduced where it lives, with no
    tensor-sized temporary, and read back in one host sync per device."""
    import torch

    extremes: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    for name, tensor in named:
        if torch.is_tensor(tensor) and tensor.is_floating_point() and tensor.numel():
            t = tensor.detach()
            extremes.append((name, t, torch.stack([t.min(), t.max()]).float()))
    finite: dict[str, bool] = {}
    for device in {str(pair.device) for _, _, pair in extremes}:
        rows = [(name, pair) for name, _, pair in extremes if str(pair.device) == device]
        verdicts = torch.isfinite(torch.stack([pair for _, pair in rows])).all(dim=1).tolist()
        finite.update((name, ok) for (name, _), ok in zip(rows, verdicts))
    for name, t, _ in extremes:
        if not finite[name]:
            return name, float(t[~torch.isfinite(t)].flatten()[0])
    return None


def check_weights(model: torch.nn.Module, source: str) -> None:
    """Refuse a model whose weights hold a NaN or an inf (a diverged or damaged checkpoint)."""
    found = first_nonfinite(model.state_dict().items())
    if found is not None:
        name, value = found
        raise NonFiniteError(
            f"the model '{source}' has non-finite weights: tensor {name} holds {value}. It cannot be trained or "
            "scored; use an earlier checkpoint of it (or the model it was trained from)"
        )


def check_step(loss: float, grad_norm: float, *, scaled: bool, world=None) -> None:
    """Raise NonFiniteError when an optimizer step's loss (this rank's sum so far) or gradient norm is NaN
    or inf. With fp16 loss scaling (`scaled`) an inf gradient norm is the scaler's business: it skips that
    step and lowers its scale. Several ranks agree on the loss's verdict (one small all-reduce)."""
    bad_loss = not math.isfinite(loss)
    if world is not None and world.active:
        bad_loss = world.sum([float(bad_loss)])[0] > 0
    if bad_loss:
        raise NonFiniteError(f"the loss is {loss if not math.isfinite(loss) else 'non-finite on another rank'}")
    if not scaled and not math.isfinite(grad_norm):
        raise NonFiniteError(f"the gradient norm is {grad_norm}")


def check_rollout(rewards: torch.Tensor | None, metrics: dict[str, float]) -> None:
    """An online step's rewards (a CPU tensor) and what `prepare` made of them (advantages, KL-shaped
    rewards: host floats in its metrics)."""
    if rewards is not None and rewards.numel():
        found = first_nonfinite([("reward", rewards)])
        if found is not None:
            raise NonFiniteError(f"a reward is {found[1]}")
    for name, value in metrics.items():
        if name.startswith(("reward", "advantage", "kl/")) and isinstance(value, float) and not math.isfinite(value):
            raise NonFiniteError(f"{name} is {value}")


def skip_step(run, err: NonFiniteError) -> str | None:
    """After a NaN/inf in a step (an engine.loop.core.Run's; the optimizer step that met it not taken):
    skip the step while `skip_nonfinite_steps` allows (returns None), else return the run's failure message."""
    from engine.loop.checkpoint import checkpoints

    step, skipped, limit = run.state.step + 1, run.state.skipped_nonfinite, run.spec.skip_nonfinite_steps
    run.optimizer.zero_grad(set_to_none=True)
    if run.precision.scaler is not None:  # fp16: forget this step's unscale_ (none yet: nothing to forget)
        with contextlib.suppress(AssertionError):
            run.precision.scaler.update()
    if len(skipped) >= limit:
        last = checkpoints(run.out_dir)
        return (
            f"step {step}: {err}. The run stopped before an optimizer step took it, so the weights stay finite "
            f"and no checkpoint was written from this step; a resume continues from "
            f"{last[-1].name if last else 'the start'}. Lower lr, or let up to N such steps be skipped "
            f"(--set skip_nonfinite_steps=N; {len(skipped)} skipped so far)"
        )
    skipped.append(step)
    with warnings.catch_warnings():  # the lr schedule still moves once per step
        warnings.simplefilter("ignore", UserWarning)
        run.scheduler.step()
    message = f"step {step} skipped: {err} (optimizer step not taken; {len(skipped)} of {limit} skips used)"
    run.reporter.log_event("nonfinite", message, step=step, skipped=len(skipped))
    log.warning("warning: %s", message)
    return None


def check_nonfinite_settings(spec) -> None:
    if not isinstance(spec.skip_nonfinite_steps, int) or spec.skip_nonfinite_steps < 0:
        raise SpecError(
            f"skip_nonfinite_steps={spec.skip_nonfinite_steps!r}: give a whole number >= 0 (how many steps with a "
            "NaN/inf loss, gradient norm, reward or advantage a run may skip before it fails; 0 = fail at the first)"
        )
