"""Checkpoints: the policy's weights (or adapter) with the optimizer, scheduler, RNG and step.

A run directory's checkpoints/step-NNNNNNN/ holds model/ (save_pretrained) and state.pt. A save
is written to a .tmp folder and renamed, so a save killed half-way never leaves a broken checkpoint.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0


def latest_checkpoint(out_dir: Path) -> Path | None:
    folder = Path(out_dir) / "checkpoints"
    found = sorted(p for p in folder.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")) if folder.exists() else []
    return found[-1] if found else None


def save_checkpoint(out_dir: Path, policy, optimizer, scheduler, state: TrainState, keep: int, extra: dict | None = None) -> Path:
    """`extra`: more state to restore on resume (an online method's value model, KL coefficient)."""
    folder = Path(out_dir) / "checkpoints"
    final = folder / f"step-{state.step:07d}"
    tmp = folder / f"step-{state.step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp / "model")
    torch.save(
        {
            "state": asdict(state),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "extra": extra or {},
        },
        tmp / "state.pt",
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # a save killed half-way leaves only a .tmp folder, never a broken checkpoint
    for old in sorted(p for p in folder.glob("step-*") if not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_extra_state(checkpoint: Path) -> dict:
    """What `save_checkpoint(..., extra=...)` stored ({} for offline runs)."""
    return torch.load(checkpoint / "state.pt", weights_only=False).get("extra", {})


def load_training_state(checkpoint: Path, optimizer, scheduler) -> TrainState:
    saved = torch.load(checkpoint / "state.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["torch"])
    random.setstate(saved["rng"]["python"])
    return TrainState(**saved["state"])


def restore(checkpoint: Path | None, resume: bool, optimizer, scheduler, reporter) -> TrainState:
    """The state to continue from: the checkpoint's (metrics after it are dropped), or a fresh start."""
    if checkpoint is not None:
        state = load_training_state(checkpoint, optimizer, scheduler)
        reporter.rewind(state.step)
        reporter.log_event("resume", f"resumed from {checkpoint.name}", step=state.step)
        return state
    if resume:
        reporter.rewind(-1)  # stopped before its first checkpoint: start over without duplicate rows
        reporter.log_event("resume", "no checkpoint yet: starting from step 0")
    return TrainState()
