"""Run a spec in this process (the `cherry train` path: quick use and debugging)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from engine.reporting import Reporter
from engine.spec import RunSpec
from jobs.home import cache_dir, cherry_home, new_run_id


def run_in_process(
    spec: RunSpec,
    out_dir: str | Path | None = None,
    reporter: Reporter | None = None,
    *,
    resume: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[Path, dict[str, Any]]:
    from engine.train import train  # torch is imported only once a run really starts

    run_dir = Path(out_dir) if out_dir else cherry_home() / new_run_id(spec.display_name)
    summary = train(spec, run_dir, reporter, should_stop=should_stop, cache_dir=cache_dir(), resume=resume)
    return run_dir, summary
