"""What the command-line modules share: one-line user errors and the flags that describe a run."""

from __future__ import annotations

import functools

import typer

from jobs import USER_ERROR_EXIT, CherryError
from tuiapp.text import safe_text


def echo(message: object = "", **kwargs) -> None:
    """typer.echo with control characters escaped: run names, samples and logs can hold terminal escapes."""
    typer.echo(safe_text(message), **kwargs)


def secho(message: object = "", **kwargs) -> None:
    typer.secho(safe_text(message), **kwargs)


def friendly(fn):
    """User errors become one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CherryError as err:
            secho(f"error: {err}", fg="red", err=True)
            raise typer.Exit(USER_ERROR_EXIT) from None

    return wrapper


# The flags that describe a run, shared by `train` and `submit` so the two stay the same.
PRESET_OPTION = typer.Option(
    "dpo", "--preset", "-p", help="Preset name (see `cherry presets`), e.g. dpo or demo/dpo, or a YAML file."
)
MODEL_OPTION = typer.Option(None, "--model", "-m", help="Local model dir or hub id; `demo` for the demo model.")
DATASET_OPTION = typer.Option(
    None, "--dataset", "-d", help="Local jsonl/json/parquet/csv/tsv, a saved datasets dir, or a hub id."
)
CONFIG_OPTION = typer.Option(
    None,
    "--config",
    "-c",
    help="A YAML config in TRL's shape (learning_rate, per_device_train_batch_size, ...) or a preset's; it overrides "
    "the preset, and --set, --model and --dataset override it.",
)
SET_OPTION = typer.Option(
    [],
    "--set",
    "-s",
    help="Override a setting: key=value (repeatable), e.g. --set beta=0.2 --set lora.r=16; TRL's names work too "
    "(--set learning_rate=1e-6). `cherry presets METHOD` lists the settings a method reads.",
)
