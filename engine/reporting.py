"""How the engine tells the world what it is doing.

The engine never imports the job store or the UI. It calls a `Reporter`: `jobs` implements one
that writes to the run store, tests collect in memory, and `RunDirReporter` keeps every run
directory self-contained (`metrics.jsonl`, `samples.jsonl`, `events.jsonl`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol


class Reporter(Protocol):
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None: ...

    def log_event(self, kind: str, message: str, **data: Any) -> None: ...

    def rewind(self, step: int) -> None:
        """On resume: forget metrics and samples logged after `step` (the last checkpoint)."""


class MemoryReporter:
    """Collects everything in lists (tests, notebooks)."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.append({"step": step, **metrics})

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        self.samples.extend({"step": step, **s} for s in samples)

    def log_event(self, kind: str, message: str, **data: Any) -> None:
        self.events.append({"kind": kind, "message": message, **data})

    def rewind(self, step: int) -> None:
        self.metrics = [row for row in self.metrics if row["step"] <= step]
        self.samples = [row for row in self.samples if row["step"] <= step]

    def series(self, name: str) -> list[float]:
        return [row[name] for row in self.metrics if name in row]


class RunDirReporter:
    """Appends JSON lines to the run directory; one object per call, flushed at once."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def _append(self, name: str, row: dict[str, Any]) -> None:
        with open(self.run_dir / name, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._append("metrics.jsonl", {"step": step, "time": round(time.time(), 3), **metrics})

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        for sample in samples:
            self._append("samples.jsonl", {"step": step, **sample})

    def log_event(self, kind: str, message: str, **data: Any) -> None:
        self._append("events.jsonl", {"time": round(time.time(), 3), "kind": kind, "message": message, **data})

    def rewind(self, step: int) -> None:
        for name in ("metrics.jsonl", "samples.jsonl"):
            path = self.run_dir / name
            if not path.exists():
                continue
            kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


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
