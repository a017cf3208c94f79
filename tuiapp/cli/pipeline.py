"""`cherry pipeline`: queue a chain of runs (SFT -> reward model -> PPO) in one command."""

from __future__ import annotations

from typing import Optional

import typer

from tuiapp.cli.options import DATASET_OPTION, MODEL_OPTION, SET_OPTION, echo, friendly


def register(app: typer.Typer) -> None:
    @app.command("pipeline")
    @friendly
    def pipeline(
        name: Optional[str] = typer.Argument(
            None, help="A pipeline in presets/pipelines/ (rlhf, demo_rlhf) or a .yaml file; none lists them."
        ),
        model: Optional[str] = MODEL_OPTION,
        dataset: Optional[str] = DATASET_OPTION,
        set_: list[str] = SET_OPTION,
    ) -> None:
        """Queue every stage of a pipeline as chained runs; --set stage.key=value changes one stage,
        --set key=value all of them; --model is the first stage's model."""
        from jobs.pipeline import list_pipelines, submit_pipeline
        from jobs.runs import Jobs

        if name is None:
            for pipeline_name, description in list_pipelines():
                echo(f"{pipeline_name:12s} {description}")
            return
        jobs = Jobs()
        runs = submit_pipeline(jobs, name, set_, model=model, dataset=dataset)
        for run in runs:
            waiting = f"  (waits for {run.parent})" if run.parent else ""
            echo(f"{run.id}  {run.spec['algorithm']}{waiting}")
        echo(
            f"queued {len(runs)} chained runs in {jobs.home}; start a worker with `cherry worker` if none is running",
            err=True,
        )
