"""Reporters for the places teams already look: TensorBoard event files and Weights & Biases.

A run's spec names them in `report_to`; the run's process (jobs/child.py, jobs/local.py) adds them
beside the store reporter, so the engine only sees the Reporter interface. `check_report_to` runs
at submit, so a run asking for a package that is not installed is refused before it is queued.
The packages are imported only when a run uses them.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from engine.errors import CherryError
from engine.spec import RunSpec, report_targets

TENSORBOARD_DIR = "tensorboard"  # inside the run directory: `tensorboard --logdir RUN_DIR/tensorboard`
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_report_to(spec: RunSpec) -> None:
    """Refuse `report_to` targets whose package is not installed, naming the pip command."""
    for target in report_targets(spec):
        if importlib.util.find_spec(PACKAGES[target]) is None:
            raise CherryError(
                f"report_to: {target} needs the {PACKAGES[target]} package, which is not installed here; "
                f"`pip install {PACKAGES[target]}` (on every worker's machine), or drop {target} from report_to"
            )


def build_reporters(spec: RunSpec, run_dir: str | Path, *, run_id: str, group: str | None = None) -> list[Any]:
    """The reporters `spec.report_to` asks for, writing for the run in `run_dir`."""
    check_report_to(spec)
    made: list[Any] = []
    for target in report_targets(spec):
        if target == "tensorboard":
            made.append(TensorBoardReporter(Path(run_dir) / TENSORBOARD_DIR))
        elif target == "wandb":
            made.append(WandbReporter(spec, run_dir, run_id=run_id, group=group))
    return made


def close_all(reporters: list[Any]) -> None:
    for reporter in reporters:
        reporter.close()


class TensorBoardReporter:
    """Scalars per step and samples as text, in TensorBoard event files (torch's SummaryWriter)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self._writer = None
        self._purge_step: int | None = None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: after a resume, TensorBoard drops the events logged past the checkpoint
            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self._purge_step)
        return self._writer

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(name, float(value), step)
        self.writer.flush()  # readers (TensorBoard, `cherry show`) see a live run's numbers at once

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        rows = [
            f"**prompt** {s.get('prompt', '')!r}  \n**policy** {s.get('policy', s.get('chosen', ''))!r}"
            for s in samples[:8]
        ]
        if rows:
            self.writer.add_text("samples", "\n\n".join(rows), step)

    def log_event(self, kind: str, message: str, **data: Any) -> None:
        pass  # events live in the store and events.jsonl; TensorBoard has no place for them

    def rewind(self, step: int) -> None:
        self.close()
        self._purge_step = step + 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbReporter:
    """Metrics and samples to Weights & Biases (offline with WANDB_MODE=offline; `wandb sync` later).
    The W&B run takes Cherry's run id, so a resumed run continues the same W&B run."""

    def __init__(self, spec: RunSpec, run_dir: str | Path, *, run_id: str, group: str | None) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "cherry"),
            id=run_id,
            name=spec.display_name,
            group=group,
            dir=str(run_dir),
            config=spec.to_dict(),
            resume="allow",
        )

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        import wandb

        columns = sorted({k for s in samples for k in s if isinstance(s[k], (str, int, float))})
        table = wandb.Table(columns=columns, data=[[s.get(c) for c in columns] for s in samples])
        self.run.log({"samples": table}, step=step)

    def log_event(self, kind: str, message: str, **data: Any) -> None:
        pass

    def rewind(self, step: int) -> None:
        pass  # W&B keeps what was logged; steps after the checkpoint are logged again on top

    def close(self) -> None:
        self.run.finish()
