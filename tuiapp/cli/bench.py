"""`cherry bench`: a thin entry to the benchmark harness, which is not one of Cherry's installed packages.

The harness (Cherry against TRL, ablations, time to the first step, the queue under load, the GPU check)
lives in the checkout's benchmarks/, its own distribution `cherry-benchmarks` (docs/benchmarks.md). When it
is installed, `cherry bench ARGS` hands ARGS to its command line (benchmarks/cli.py); when it is not, one
message says how to install it and the command exits 2. The harness imports Cherry, never the other way:
it is found by name at call time only."""

from __future__ import annotations

import importlib

import typer

from jobs import USER_ERROR_EXIT

HARNESS = "benchmarks.cli"
NOT_INSTALLED = (
    "cherry bench: the benchmarks are not installed (they are not part of Cherry's packages). From a Cherry "
    "checkout: pip install -e ./benchmarks (and pip install -e '.[bench]' for TRL, which --against trl needs); "
    "see docs/benchmarks.md. Nothing was measured."
)


def register(app: typer.Typer) -> None:
    # Every argument, --help included, is the harness's to parse: this entry has no options of its own.
    @app.command(
        "bench",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        add_help_option=False,
    )
    def bench(ctx: typer.Context) -> None:
        """Benchmarks: Cherry against TRL, ablations, the queue under load (installed apart: docs/benchmarks.md)."""
        try:
            harness = importlib.import_module(HARNESS)
        except ModuleNotFoundError as err:
            if err.name not in ("benchmarks", HARNESS):  # installed, but something it imports is missing
                raise
            typer.secho(NOT_INSTALLED, fg="red", err=True)
            raise typer.Exit(USER_ERROR_EXIT) from None
        command = typer.main.get_command(harness.bench_app)
        command.main(args=ctx.args, prog_name="cherry bench", standalone_mode=True)
