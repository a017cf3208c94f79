"""Checkpoints: the policy's weights (or adapter) with the optimizer, scheduler, RNG and step.

A run directory's checkpoints/step-NNNNNNN/ holds model/ (save_pretrained) and state.pt. A save
is written to a .tmp folder and renamed, so a save killed half-way never leaves a broken checkpoint.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engine.diskspace import tensor_bytes, write_folder
from engine.errors import CherryError
from engine.reporting import Reporter

log = logging.getLogger("cherry.engine")


class CheckpointError(CherryError):
    """A checkpoint cannot be read back (truncated, tampered with, or from another run)."""


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    world_size: int = 1  # processes of the data-parallel run that wrote it
    global_batch: int = 0  # examples (prompts online) per optimizer step over all ranks; 0 = not recorded
    skipped_nonfinite: list = field(default_factory=list)  # steps skipped for a NaN/inf (skip_nonfinite_steps)


_CHECKPOINT_NAME = re.compile(r"step-\d+")
STATE_KEYS = ("state", "optimizer", "scheduler", "rng", "extra")


def checkpoints(out_dir: Path) -> list[Path]:
    """A run's complete checkpoints, oldest first (not a half-written `.tmp` nor one moved aside)."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and _CHECKPOINT_NAME.fullmatch(p.name))


def rng_states() -> dict:
    """Every random generator a run draws from: CPU torch, Python, and each visible GPU's (online methods
    sample completions on the GPU, so a resume without them would draw different completions)."""
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available():
        # A checkpoint from a machine with more GPUs restores the ones this machine has.
        for index, state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device=index)


def save_checkpoint(
    out_dir: Path,
    policy,
    optimizer,
    scheduler,
    state: TrainState,
    keep: int,
    extra: dict | None = None,
    *,
    model_state: dict | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """`extra`: more state to restore on resume (an online method's value model, KL coefficient).
    `model_state` / `optimizer_state`: a sharded run's full state, gathered (else the model's and the
    optimizer's own); either way the checkpoint has one format, whatever the run's parallelism.

    state.pt holds only tensors and plain values (dicts, lists, tuples, numbers, strings), so it
    loads with `torch.load(weights_only=True)`: reading a checkpoint never runs code from the file.
    """
    folder = Path(out_dir) / "checkpoints"
    optimizer_state = optimizer_state if optimizer_state is not None else optimizer.state_dict()

    def write(tmp: Path) -> None:
        policy.save_pretrained(tmp / "model", state_dict=model_state)
        torch.save(
            {
                "state": asdict(state),
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "rng": rng_states(),
                "extra": extra or {},
            },
            tmp / "state.pt",
        )

    # written to step-N.tmp and renamed: a save killed half-way or cut short by a full disk leaves no
    # broken checkpoint, and the ones before it are removed only once it is complete
    trained = model_state if model_state is not None else [p for p in policy.parameters() if p.requires_grad]
    needed = tensor_bytes(trained) + tensor_bytes(optimizer_state)
    final = write_folder(folder / f"step-{state.step:07d}", write, f"checkpoint step-{state.step:07d}", needed)
    for old in checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint_state(checkpoint: Path, *, mmap: bool = False) -> dict:
    """state.pt as saved, read with weights_only=True (tensors and plain values; any other object in
    the file is refused, never constructed), onto the CPU: a GPU run's state would otherwise come back
    on the GPU that saved it (rank 0's, for every rank), and could not resume on a machine without it.
    Loading into the optimizer moves each tensor to its parameter's device. `mmap` maps tensors lazily:
    a cheap full check of the file."""
    path = Path(checkpoint) / "state.pt"
    try:
        saved = torch.load(path, weights_only=True, mmap=mmap, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {checkpoint} has no state.pt") from None
    except Exception as err:  # noqa: BLE001 - truncated zip, a pickle naming code, bad bytes: all one answer
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint file {path} cannot be read safely ({reason})") from None
    if not isinstance(saved, dict) or not set(STATE_KEYS) <= set(saved):
        raise CheckpointError(f"checkpoint file {path} is not a Cherry checkpoint (no {', '.join(STATE_KEYS)})")
    return saved


def check_checkpoint(checkpoint: Path) -> None:
    """Raise CheckpointError unless `checkpoint` reads back whole: its state.pt and its weights' headers."""
    from safetensors import safe_open

    read_checkpoint_state(checkpoint, mmap=True)
    model = Path(checkpoint) / "model"
    weights = sorted(model.glob("*.safetensors"))
    if not weights or not any((model / name).is_file() for name in ("config.json", "adapter_config.json")):
        raise CheckpointError(f"checkpoint {checkpoint} has no saved model in {model}")
    for file in weights:
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"checkpoint weights {file} cannot be read ({err})") from None


def resume_checkpoint(out_dir: Path, reporter: Reporter) -> Path | None:
    """The newest checkpoint that reads back whole. A newer one that does not (truncated, tampered) is
    moved aside to `step-N.unreadable`, kept for inspection, and the run continues from the one before."""
    for checkpoint in reversed(checkpoints(out_dir)):
        try:
            check_checkpoint(checkpoint)
            return checkpoint
        except CheckpointError as err:
            aside = checkpoint.with_name(checkpoint.name + ".unreadable")
            shutil.rmtree(aside, ignore_errors=True)
            checkpoint.rename(aside)
            message = f"{err}; moved it aside to {aside.name} and resuming from the checkpoint before it"
            reporter.log_event("warning", message, checkpoint=checkpoint.name)
            log.warning("warning: %s", message)
    return None


def load_training_state(checkpoint: Path, optimizer, scheduler, load_optimizer=None, saved=None) -> TrainState:
    """`load_optimizer(state)`: how this run loads the saved optimizer state (a sharded run keeps its shard);
    `saved`: the checkpoint's state.pt when the caller has read it already."""
    saved = saved if saved is not None else read_checkpoint_state(checkpoint)
    try:
        (load_optimizer or optimizer.load_state_dict)(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        set_rng_states(saved["rng"])
        return TrainState(**saved["state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"checkpoint {checkpoint} does not fit this run ({err}); move it aside "
            f"(mv {checkpoint} {checkpoint}.unreadable) and resume again to continue from the one before"
        ) from None


def restore(
    checkpoint: Path | None, resume: bool, optimizer, scheduler, reporter, load_optimizer=None, saved=None
) -> TrainState:
    """The state to continue from: the checkpoint's (metrics after it are dropped), or a fresh start."""
    if checkpoint is not None:
        state = load_training_state(checkpoint, optimizer, scheduler, load_optimizer, saved)
        reporter.rewind(state.step)
        reporter.log_event("resume", f"resumed from {checkpoint.name}", step=state.step)
        return state
    if resume:
        reporter.rewind(-1)  # stopped before its first checkpoint: start over without duplicate rows
        reporter.log_event("resume", "no checkpoint yet: starting from step 0")
    return TrainState()
