"""The `cherry` command line: one module per group of commands.

- train.py: `train`, `score`, `export`, `presets` (runs in this terminal);
- runs.py: `submit`, `ls`, `show`, `metrics`, `samples`, `logs`, `cancel`, `resume`, `rm`, `worker`, ...
  (runs through the queue and the store, jobs/);
- experiments.py: `sweep`, `tag`, `untag`, `note` (runs grouped as experiments);
- pipeline.py: `pipeline` (chained runs); demo.py: `demo`; bench.py: `bench`;
- options.py: the flags shared by commands and the one-line error handling.

Only typer and torch-free modules are imported at start-up, so `cherry --help` answers at once; the
training stack is imported inside the commands that need it.
"""

from __future__ import annotations

import typer

from jobs.trust import keep_files_private
from tuiapp.cli import experiments, pipeline, runs, train
from tuiapp.cli.bench import bench_app
from tuiapp.cli.demo import demo_app
from tuiapp.cli.options import friendly

app = typer.Typer(
    help="Cherry: preference training of language models from the terminal.",
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
train.register(app)
app.add_typer(demo_app, name="demo")
app.add_typer(bench_app, name="bench")
runs.register(app)
experiments.register(app)
pipeline.register(app)


@app.callback()
@friendly
def _open_app(ctx: typer.Context) -> None:
    """With no command, open the Textual app."""
    keep_files_private()  # the store, samples, logs and caches this command (and its workers) write: 0600
    if ctx.invoked_subcommand is None:
        from tuiapp.app import run_app

        run_app()


def main() -> None:
    app()
