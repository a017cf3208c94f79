"""The `cherry` command line: one module per group of commands.

- train.py: `train`, `score`, `export`, `presets` (runs in this terminal);
- runs.py: `submit`, `ls`, `show`, `metrics`, `samples`, `logs`, `cancel`, `resume`, `rm`, `worker`, ...
  (runs through the queue and the store, jobs/);
- manifest.py: `compare` (settings and manifest facts that differ), the manifest `show` prints;
- rollouts.py: `rollouts` (an online run's training rollouts: list, filter, export);
- experiments.py: `sweep`, `tag`, `untag`, `note` (runs grouped as experiments);
- pipeline.py: `pipeline` (chained runs); demo.py: `demo`; bench.py: `bench` (a thin entry to benchmarks/);
- options.py: the flags shared by commands and the one-line error handling.

Only typer and torch-free modules are imported at start-up, so `cherry --help` answers at once; the
training stack is imported inside the commands that need it.
"""

from __future__ import annotations

import typer

from jobs.trust import keep_files_private
from tuiapp.cli import bench, experiments, manifest, pipeline, rollouts, runs, train
from tuiapp.cli.demo import demo_app
from tuiapp.cli.options import friendly


def _flags_show_no_type() -> None:
    """typer's help prints `<bool>` beside a flag such as --json, which reads as if it took a value
    (`cherry ls --json true`); a flag shows no type."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else shown(self, ctx)


_flags_show_no_type()

app = typer.Typer(
    help="Cherry: preference training of language models from the terminal.",
    context_settings={"help_option_names": ["-h", "--help"]},
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
train.register(app)
app.add_typer(demo_app, name="demo")
bench.register(app)
runs.register(app)
rollouts.register(app)
manifest.register(app)
experiments.register(app)
pipeline.register(app)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"cherry {version('cherry-rlhf')}")
        raise typer.Exit()


@app.callback()
@friendly
def _open_app(
    ctx: typer.Context,
    version: bool = typer.Option(
        False, "--version", "-V", callback=_print_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """With no command, open the Textual app."""
    keep_files_private()  # the store, samples, logs and caches this command (and its workers) write: 0600
    if ctx.invoked_subcommand is None:
        from tuiapp.app import run_app

        run_app()


def main() -> None:
    app()
