"""How the engine tells the world what it is doing.

The engine never imports the job store or the UI. It calls a `Reporter`: `jobs` implements one
that writes to the run store, tests collect in memory, and `RunDirReporter` keeps every run
directory self-contained (`metrics.jsonl`, `samples.jsonl`, `events.jsonl`, the online methods'
rollout store `rollouts/`, engine/rollout_store.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol, TextIO

from engine.rollout_store import remove_shards_after, shard_path, write_shard


class Reporter(Protocol):
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None: ...

    def log_event(self, kind: str, message: str, **data: Any) -> None: ...

    def rewind(self, step: int) -> None:
        """On resume: forget metrics and samples logged after `step` (the last checkpoint)."""

    def log_rollouts(self, step: int, records: list[dict[str, Any]]) -> None:
        """Optional: one step's rollout records (engine/rollout_store.py); `MultiReporter` skips a reporter
        without it (TensorBoard, W&B and hooks have no place for them)."""


class NullReporter:
    """Reports nothing: the ranks of a data-parallel run other than rank 0 (which reports for all)."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        pass

    def log_event(self, kind: str, message: str, **data: Any) -> None:
        pass

    def rewind(self, step: int) -> None:
        pass

    def log_rollouts(self, step: int, records: list[dict[str, Any]]) -> None:
        pass


class MemoryReporter:
    """Collects everything in lists (tests, notebooks)."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.rollouts: list[dict[str, Any]] = []

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.append({"step": step, **metrics})

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        self.samples.extend({"step": step, **s} for s in samples)

    def log_event(self, kind: str, message: str, **data: Any) -> None:
        self.events.append({"kind": kind, "message": message, **data})

    def log_rollouts(self, step: int, records: list[dict[str, Any]]) -> None:
        self.rollouts.extend(records)

    def rewind(self, step: int) -> None:
        self.metrics = [row for row in self.metrics if row["step"] <= step]
        self.samples = [row for row in self.samples if row["step"] <= step]
        self.rollouts = [row for row in self.rollouts if row["step"] <= step]

    def series(self, name: str) -> list[float]:
        return [row[name] for row in self.metrics if name in row]


class RunDirReporter:
    """Appends JSON lines to the run directory; one object per call, flushed at once."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def _append(self, name: str, row: dict[str, Any]) -> None:
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with open(self.run_dir / name, "ab") as f:
            start = f.tell()
            try:
                f.write(line)
                f.flush()
            except OSError as err:
                f.truncate(start)  # no half line for a resume to trip over
                raise _write_error(self.run_dir / name, err, len(line)) from None

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._append("metrics.jsonl", {"step": step, "time": round(time.time(), 3), **metrics})

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        for sample in samples:
            self._append("samples.jsonl", {"step": step, **sample})

    def log_event(self, kind: str, message: str, **data: Any) -> None:
        self._append("events.jsonl", {"time": round(time.time(), 3), "kind": kind, "message": message, **data})

    def log_rollouts(self, step: int, records: list[dict[str, Any]]) -> None:
        try:
            write_shard(self.run_dir, step, records)
        except OSError as err:
            raise _write_error(shard_path(self.run_dir, step), err) from None

    def rewind(self, step: int) -> None:
        remove_shards_after(self.run_dir, step)
        for name in ("metrics.jsonl", "samples.jsonl"):
            path = self.run_dir / name
            if not path.exists():
                continue
            kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _step_of(line) <= step]
            try:
                path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            except OSError as err:
                raise _write_error(path, err) from None


def _step_of(line: str) -> float:
    """A JSON line's step; a line cut short (a crash mid-write) counts as after every step: it is dropped."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _write_error(path: Path, err: OSError, needed: int | None = None) -> Exception:
    from engine.diskspace import disk_full_error, is_disk_full

    return disk_full_error(path.name, path.parent, needed) if is_disk_full(err) else err


class MultiReporter:
    """Sends every call to several reporters (e.g. the run dir and the store)."""

    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = reporters

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for r in self.reporters:
            r.log_metrics(step, metrics)

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        for r in self.reporters:
            r.log_samples(step, samples)

    def log_event(self, kind: str, message: str, **data: Any) -> None:
        for r in self.reporters:
            r.log_event(kind, message, **data)

    def rewind(self, step: int) -> None:
        for r in self.reporters:
            r.rewind(step)

    def log_rollouts(self, step: int, records: list[dict[str, Any]]) -> None:
        for r in self.reporters:
            if hasattr(r, "log_rollouts"):  # optional (see Reporter)
                r.log_rollouts(step, records)


class ProgressReporter:
    """A live progress line (step, bar, key metrics, ETA) on a terminal; every ~5% as lines in a log."""

    KEYS = {
        "train/loss": "loss",
        "rewards/margin": "margin",
        "rewards/accuracy": "acc",
        "kl/mean": "kl",
        "eval/exact_match": "exact",
    }

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.total = 0
        self.first_step: int | None = None
        self.started = 0.0
        self.latest: dict[str, float] = {}

    def log_event(self, kind: str, message: str, **data: Any) -> None:
        if kind == "start":
            self.total = data.get("total_steps", 0)
            self.first_step = data.get("step", 0)
            self.started = time.time()
        self._line_break()
        print(f"[{kind}] {message}", file=self.stream, flush=True)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.latest.update(metrics)
        if not self.total:
            return
        done = step - (self.first_step or 0)
        elapsed = time.time() - self.started
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        width = 20
        filled = int(width * step / self.total)
        parts = [f"{label} {self.latest[key]:.3f}" for key, label in self.KEYS.items() if key in self.latest]
        line = (
            f"step {step}/{self.total} [{'#' * filled}{'.' * (width - filled)}] "
            + "  ".join(parts)
            + f"  ETA {eta:4.0f}s"
        )
        evals = {name: value for name, value in metrics.items() if name.startswith("eval/")}
        if self.tty:
            print("\r" + line[:160].ljust(160), end="", file=self.stream, flush=True)
        elif evals:  # a log file gets eval results on their own line, once
            shown = "  ".join(f"{name[5:]} {value:.4f}" for name, value in sorted(evals.items())[:8])
            print(f"step {step}/{self.total} eval: {shown}", file=self.stream, flush=True)
        elif step == self.total or step % max(1, self.total // 20) == 0:
            print(line, file=self.stream, flush=True)

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        pass

    def rewind(self, step: int) -> None:
        pass

    def _line_break(self) -> None:
        if self.tty and self.latest:
            print(file=self.stream)
