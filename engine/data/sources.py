"""Where a run's rows come from: one dataset or a weighted mixture of several, each a local file, a
saved `datasets` directory, a directory in the Hub's repository layout or a hub id, read by config
and split, with its columns renamed by a column map.

A hub id and a directory in the Hub's layout (a README.md whose YAML front matter lists `configs:`
with data files per split, or a `data/` folder of per-split files) are read by
`datasets.load_dataset(path, name=config, split=split)`: the rows stay an Arrow table, memory-mapped
from `datasets`' cache, and are never turned into Python dicts as a whole. A local data file is read
by engine.data.load (its own line-numbered errors). Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.data.hub import load_saved, load_with_datasets
from engine.data.load import DATA_FILE_SUFFIXES, load_rows, plain
from engine.errors import DataError, SpecError
from engine.spec import looks_local

_MIXTURE_KEYS = ("path", "name", "split", "test_split", "data_files", "columns", "column_map", "weight")


@dataclass
class DataSource:
    """One dataset of a run: where, which config and split, which columns under which names, how much."""

    path: Any  # a path or hub id (str), or rows (a list of dicts)
    config: str | None = None
    split: str = "train"
    test_split: str | None = None  # its eval rows (replaces the held-out fraction)
    data_files: Any = None  # as datasets.load_dataset takes it: a path, a list, or {split: paths}
    columns: list[str] | None = None  # keep only these columns (before the column map)
    column_map: dict[str, str] = field(default_factory=dict)  # standard name -> the data's column
    weight: float = 1.0  # the fraction of its rows taken (seeded)

    @property
    def name(self) -> str:
        if not isinstance(self.path, (str, os.PathLike)):
            return "rows"
        text = os.fspath(self.path)
        return (
            text + (f" ({self.config})" if self.config else "") + (f" [{self.split}]" if self.split != "train" else "")
        )

    def describe(self) -> dict[str, Any]:
        """What the cache key and the data report say about this source (JSON-able)."""
        return {
            "name": self.name,
            "config": self.config,
            "split": self.split,
            "test_split": self.test_split,
            "data_files": self.data_files,
            "columns": self.columns,
            "column_map": dict(self.column_map),
            "weight": self.weight,
        }


# ----------------------------------------------------------------------------- settings


def _check_column_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise SpecError(
            f"{where} must map the standard column names to your data's, e.g. "
            f"{{prompt: question, chosen: good, rejected: bad}} (got {value!r})"
        )
    targets = list(value.values())
    repeated = sorted({t for t in targets if targets.count(t) > 1})
    if repeated:
        raise SpecError(f"{where} names the column '{repeated[0]}' for two standard names; give each its own column")
    return {str(k): str(v) for k, v in value.items()}


def _check_split(value: Any, where: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{where} must be the name of a split, such as train or test_prefs (got {value!r})")
    return value.strip()


def _mixture_source(entry: Any, i: int) -> DataSource:
    where = f"dataset_mixture.datasets[{i}]"
    if not isinstance(entry, Mapping):
        raise SpecError(f"{where} must be a mapping such as {{path: data/a.jsonl, weight: 0.5}} (got {entry!r})")
    unknown = sorted(set(entry) - set(_MIXTURE_KEYS))
    if unknown:
        raise SpecError(f"{where}: unknown key '{unknown[0]}'; a source takes {', '.join(_MIXTURE_KEYS)}")
    path = entry.get("path")
    if not isinstance(path, str) or not path.strip():
        raise SpecError(f"{where}: 'path' is required: a local file or directory, or a hub id")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1:
        raise SpecError(
            f"{where}.weight must be in (0, 1]: the fraction of the source's rows taken (got {weight!r}); "
            "1 takes every row"
        )
    columns = entry.get("columns")
    if columns is not None and (not isinstance(columns, list) or not all(isinstance(c, str) for c in columns)):
        raise SpecError(f"{where}.columns must be a list of column names to keep (got {columns!r})")
    name = entry.get("name")
    if name is not None and not isinstance(name, str):
        raise SpecError(f"{where}.name is the dataset's config name, a string (got {name!r})")
    return DataSource(
        path=path.strip(),
        config=name,
        split=_check_split(entry.get("split", "train"), f"{where}.split"),
        test_split=_check_split(entry.get("test_split"), f"{where}.test_split", optional=True),
        data_files=entry.get("data_files"),
        columns=columns,
        column_map=_check_column_map(entry.get("column_map"), f"{where}.column_map"),
        weight=float(weight),
    )


def mixture_sources(mixture: Any) -> list[DataSource]:
    """The sources of a `dataset_mixture` setting (TRL's shape: {datasets: [{path, name, split, ...}]})."""
    if not isinstance(mixture, Mapping) or not isinstance(mixture.get("datasets"), list) or not mixture["datasets"]:
        raise SpecError(
            "dataset_mixture must be a mapping with a non-empty list 'datasets', e.g. "
            "{datasets: [{path: a.jsonl, weight: 0.5}, {path: org/b, split: train}]}"
        )
    unknown = sorted(set(mixture) - {"datasets", "test_split_size"})
    if unknown:
        raise SpecError(f"dataset_mixture: unknown key '{unknown[0]}'; it takes datasets (and test_split_size)")
    size = mixture.get("test_split_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, float)) or not 0 <= size < 1):
        raise SpecError(f"dataset_mixture.test_split_size must be a fraction in [0, 1) (got {size!r})")
    return [_mixture_source(entry, i) for i, entry in enumerate(mixture["datasets"])]


def check_data_settings(spec: Any) -> None:
    """The value checks of dataset_config, dataset_train_split, dataset_test_split, dataset_mixture, column_map."""
    if spec.dataset_config is not None and (not isinstance(spec.dataset_config, str) or not spec.dataset_config):
        raise SpecError(f"dataset_config must be a config name such as main (got {spec.dataset_config!r})")
    _check_split(spec.dataset_train_split, "dataset_train_split")
    _check_split(spec.dataset_test_split, "dataset_test_split", optional=True)
    _check_column_map(spec.column_map, "column_map")
    if spec.dataset_test_split is not None and spec.eval_dataset:
        raise SpecError(
            "dataset_test_split and eval_dataset both give the eval rows; keep one (--set dataset_test_split=null)"
        )
    if spec.dataset_mixture is not None:
        if spec.dataset:
            raise SpecError(
                "dataset and dataset_mixture are both set; keep one (--set dataset=null to train on the mixture)"
            )
        mixture_sources(spec.dataset_mixture)


def spec_sources(spec: Any) -> list[DataSource]:
    """The run's data sources: its `dataset_mixture`, or `dataset` read by config and split."""
    if spec.dataset_mixture is not None:
        sources = mixture_sources(spec.dataset_mixture)
        for source in sources:  # a top-level column map applies to every source that does not map the column
            source.column_map = {**(spec.column_map or {}), **source.column_map}
        return sources
    return [
        DataSource(
            path=spec.dataset,
            config=spec.dataset_config,
            split=spec.dataset_train_split,
            test_split=spec.dataset_test_split,
            column_map=dict(spec.column_map or {}),
        )
    ]


def mixture_eval_split(spec: Any) -> float:
    """The held-out fraction of each source without a test split."""
    size = (spec.dataset_mixture or {}).get("test_split_size")
    return float(size) if size is not None else float(spec.eval_split)


def resolve_mixture_paths(spec: Any) -> None:
    """The mixture's local paths made absolute, as `dataset` is (workers may run elsewhere)."""
    if not spec.dataset_mixture:
        return
    from engine.spec import resolve_path

    entries = spec.dataset_mixture.get("datasets") or []
    for i, entry in enumerate(entries):
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            entry["path"] = resolve_path(entry["path"], f"dataset_mixture.datasets[{i}].path", kind="data")


# ----------------------------------------------------------------------------- loading


def is_hub_layout(path: Path) -> bool:
    """A directory `datasets.load_dataset` reads as it reads a hub repository: a README.md (its
    `configs:` front matter) or a data/ folder of split files."""
    return (path / "README.md").is_file() or (path / "data").is_dir()


def _is_saved(path: Path) -> bool:
    return any((path / name).exists() for name in ("dataset_dict.json", "state.json"))


def _has_one_file_for(path: Path, split: str) -> bool:
    files = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_FILE_SUFFIXES]
    return len(files) == 1 or sum(p.stem == split for p in files) == 1


def load_split(source: DataSource, split: str, *, max_rows: int | None = None, streaming: bool = False) -> Any:
    """One split of a source: a list of row dicts (a local data file, rows given directly, a folder
    of plain files) or a `datasets.Dataset` (a hub id, a Hub-layout or saved directory)."""
    if not isinstance(source.path, (str, os.PathLike)):
        return source.path
    text = os.fspath(source.path)
    path = Path(text).expanduser()
    datasets_reads_it = source.config is not None or source.data_files is not None
    if path.is_dir() and _is_saved(path):
        data = load_saved(path, split)
    elif path.is_dir() and (datasets_reads_it or is_hub_layout(path) or not _has_one_file_for(path, split)):
        data = load_with_datasets(str(path), source.config, split, source.data_files, streaming=streaming)
    elif path.exists() or looks_local(text):
        return load_rows(text, split, max_rows=max_rows)
    else:
        data = load_with_datasets(text, source.config, split, source.data_files, streaming=streaming)
    if streaming and not hasattr(data, "select"):
        return [plain(row) for row in data.take(max_rows or 100)]
    if max_rows is not None and len(data) > max_rows:
        data = data.select(range(max_rows))
    if len(data) == 0:
        raise DataError(f"dataset {source.name} split '{split}' is empty (no rows); give a split with rows")
    return data


def column_names(data: Any) -> list[str]:
    return list(data.column_names) if hasattr(data, "column_names") else [str(c) for c in (data[0] if data else {})]


def shape_columns(data: Any, source: DataSource) -> Any:
    """Keep `source.columns`, then rename by `source.column_map` (standard name -> the data's column); a
    column the data does not have is refused, naming it."""
    found = column_names(data)
    if source.columns:
        missing = [c for c in source.columns if c not in found]
        if missing:
            raise DataError(
                f"dataset {source.name}: columns names '{missing[0]}', which the data does not have "
                f"(its columns: {', '.join(found)})"
            )
    wanted = list(source.columns) if source.columns else found
    for standard, column in source.column_map.items():
        if column not in wanted:
            raise DataError(
                f"column_map of {source.name}: {standard}: {column} names the column '{column}', which the data "
                f"does not have (its columns: {', '.join(wanted)}); fix the column name"
            )
    renames = {column: standard for standard, column in source.column_map.items() if column != standard}
    # A column already called by a mapped standard name gives way to the one the map names.
    replaced = {standard for standard in renames.values() if standard in wanted and standard not in renames}
    keep = [c for c in wanted if c not in replaced]
    if hasattr(data, "select_columns"):
        if keep != found:
            data = data.select_columns(keep)
        return data.rename_columns(renames) if renames else data
    if keep == found and not renames:
        return data
    return [{renames.get(c, c): row.get(c) for c in keep} for row in data]


def take_weight(data: Any, weight: float, seed: int) -> Any:
    """The seeded fraction `weight` of the rows (at least one), in their order."""
    if weight >= 1:
        return data
    n = len(data)
    k = max(1, math.floor(n * weight + 0.5))
    picked = sorted(random.Random(seed).sample(range(n), k))
    return data.select(picked) if hasattr(data, "select") else [data[i] for i in picked]


def first_rows(data: Any, n: int = 1) -> list[dict]:
    if hasattr(data, "select"):
        return [plain(row) for row in data.select(range(min(n, len(data)))).to_list()]
    return [plain(row) for row in data[:n]]


def fingerprint(source: DataSource, split: str | None) -> str | None:
    """What identifies the rows of a source's split for the tokenised-data cache: the local files'
    contents, or a hub dataset's `datasets` fingerprint (which hashes its files and config); None for
    rows passed directly (not cached)."""
    from engine.data.cache import source_fingerprint

    if not isinstance(source.path, (str, os.PathLike)):
        return None
    local = source_fingerprint(source.path)
    if local is not None:
        return local
    if split is None:
        return "none"
    data = load_split(source, split)
    return getattr(data, "_fingerprint", None) or json.dumps(str(data))
