"""A split of a hub dataset, or of a local directory in the Hub's repository layout, through `datasets`.

The one place Cherry calls `datasets.load_dataset`: engine.data.load (a directory given as `dataset`) and
engine.data.sources (configs, splits, mixtures) both read through it. A config or split that does not
exist is one DataError listing those that do.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from engine.errors import DataError, first_line


def _base_split(split: str) -> str:
    return re.split(r"[\[+]", split, maxsplit=1)[0].strip()  # "train[:10%]" reads split "train"


def _config_names(path: str) -> list[str]:
    try:
        import datasets

        return list(datasets.get_dataset_config_names(path))
    except Exception:  # noqa: BLE001 - only used to say what exists
        return []


def _builder(path: str, config: str | None, data_files: Any) -> Any:
    import datasets

    try:
        return datasets.load_dataset_builder(path, name=config, data_files=data_files)
    except Exception as exc:  # noqa: BLE001 - any builder failure is a user-facing data error
        configs = _config_names(path)
        if config is not None and configs and config not in configs:
            raise DataError(
                f"dataset {path} has no config '{config}'; its configs are: {', '.join(configs)} "
                "(set dataset_config, or a mixture source's name, to one of them)"
            ) from exc
        if config is None and len(configs) > 1:
            raise DataError(
                f"dataset {path} has several configs ({', '.join(configs)}); choose one with dataset_config"
            ) from exc
        local = Path(path).expanduser().exists()
        raise DataError(
            f"could not load '{path}'{f' (config {config})' if config else ''} with datasets ({first_line(exc)}); "
            + (
                "check the directory's README.md configs and data files"
                if local
                else "check the id and that this machine can reach the hub, or download it and pass the local directory"
            )
        ) from exc


def _splits_of(builder: Any) -> list[str]:
    files = getattr(builder.config, "data_files", None)
    if files:
        return [str(s) for s in files]
    splits = getattr(builder.info, "splits", None)
    return [str(s) for s in splits] if splits else []


def load_with_datasets(
    path: str, config: str | None, split: str, data_files: Any = None, *, streaming: bool = False
) -> Any:
    """A hub dataset's (or a Hub-layout directory's) split as a `datasets.Dataset` (memory-mapped), or an
    IterableDataset when `streaming` (the submit-time check reads only its first rows)."""
    import datasets

    builder = _builder(path, config, data_files)
    splits = _splits_of(builder)
    if splits and _base_split(split) not in splits:
        raise DataError(
            f"dataset {path}{f' (config {builder.config.name})' if config else ''} has no split '{split}'; "
            f"its splits are: {', '.join(splits)} (set dataset_train_split / dataset_test_split to one of them)"
        )
    bars_were_on = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        return datasets.load_dataset(path, name=config, split=split, data_files=data_files, streaming=streaming)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"could not read split '{split}' of {path} ({first_line(exc)})") from exc
    finally:
        if bars_were_on:
            datasets.utils.logging.enable_progress_bar()


def load_saved(path: Path, split: str) -> Any:
    """A directory written by `save_to_disk`: its `split` when it holds several (a DatasetDict)."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"could not read saved dataset directory {path} ({first_line(exc)})") from exc
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise DataError(f"saved dataset {path} has no split '{split}'; its splits are: {', '.join(saved)}")
        saved = saved[split]
    return saved
