"""Read a dataset into plain row dicts: a local JSONL/JSON/Parquet/CSV file, a saved `datasets`
directory or a hub id. File line numbers in errors count from 1, like an editor."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.errors import DataError, first_line
from engine.limits import JSONL_MAX_LINE_CHARS
from engine.spec import looks_local

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv")


def load_rows(source: str, split: str = "train", *, max_rows: int | None = None) -> list[dict]:
    """Rows of a local data file, a saved `datasets` directory or a hub dataset, as plain dicts.

    `max_rows` keeps only the first rows (applied before converting a large dataset to dicts).
    """
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"dataset source must be a path or hub id, got {type(source).__name__}")
    text = os.fspath(source)
    if not text.strip():
        raise DataError("dataset source is empty; give a local data file, a saved dataset directory or a hub id")
    path = Path(text).expanduser()
    if path.is_file():
        rows = _load_file(path)
    elif path.is_dir():
        rows = _load_dir(path, split, max_rows)
    elif looks_local(text):
        raise DataError(f"dataset file {text} does not exist; check the path (looked for {path.absolute()})")
    else:
        rows = _load_hub(text, split, max_rows)
    if max_rows is not None:
        rows = rows[:max_rows]
    if not rows:
        raise DataError(f"dataset {text} is empty (no rows); give a dataset with at least one row")
    return rows


def _load_hub(source: str, split: str, max_rows: int | None) -> list[dict]:
    try:
        import datasets

        ds = datasets.load_dataset(source, split=split)
    except Exception as exc:  # noqa: BLE001 - any hub/network/builder failure is a user-facing data error
        raise DataError(
            f"could not load '{source}' (split '{split}') as a Hugging Face hub dataset ({first_line(exc)}); "
            "check the id and that this machine can reach the hub, or download it and pass a local "
            ".jsonl/.json/.parquet/.csv file or a saved dataset directory"
        ) from exc
    return _dataset_rows(ds, max_rows)


def _dataset_rows(ds: Any, max_rows: int | None) -> list[dict]:
    if max_rows is not None and len(ds) > max_rows:
        ds = ds.select(range(max_rows))
    return [plain(row) for row in ds.to_list()]


def _load_dir(path: Path, split: str, max_rows: int | None) -> list[dict]:
    if any((path / name).exists() for name in ("dataset_dict.json", "state.json", "dataset_info.json")):
        from engine.data.hub import load_saved

        return _dataset_rows(load_saved(path, split), max_rows)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_FILE_SUFFIXES)
    named = [p for p in files if p.stem == split]
    hub_layout = (path / "README.md").is_file() or (path / "data").is_dir()
    if len(named) == 1 and not hub_layout:
        return _load_file(named[0])
    if len(files) == 1 and not hub_layout:
        return _load_file(files[0])
    # The Hub's repository layout (README configs, per-split files): read as its hub id would be.
    from engine.data.hub import load_with_datasets

    return _dataset_rows(load_with_datasets(str(path), None, split), max_rows)


def _load_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _json_lines(path, _read_text(path))
    if suffix == ".json":
        return _json_file(path)
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{path} is not a readable Parquet file ({first_line(exc)})") from exc
        return [plain(row) for row in table.to_pylist()]
    if suffix in (".csv", ".tsv"):
        return _delimited_rows(path, "\t" if suffix == ".tsv" else ",")
    raise DataError(
        f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(DATA_FILE_SUFFIXES)} "
        "or a saved dataset directory"
    )


def _csv_flag(value: str) -> bool | str:
    """A CSV cell of a boolean column: true/false, yes/no or 1/0 (any case); other text is kept for
    the column's own check to report."""
    low = value.strip().lower()
    return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(low, value)


def _csv_number(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


# The columns of a CSV/TSV file that are not text: every other cell stays the exact text written
# (so an answer "065" or "12" is text, as in the file).
_TYPED_CELLS = {"label": _csv_flag, "safety": _csv_flag, "margin": _csv_number}


def _delimited_rows(path: Path, sep: str) -> list[dict]:
    import pandas as pd

    what = "TSV" if sep == "\t" else "CSV"
    try:
        # dtype=str and no NA parsing: "12", "NA" and "null" are answers a user may have written.
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        return []
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path} is not a readable {what} file ({first_line(exc)})") from exc
    rows = frame.to_dict(orient="records")
    for row in rows:
        for column, cell in row.items():
            # An empty cell is a missing value (no answer, no label), as in a JSON row without it.
            row[column] = _TYPED_CELLS.get(column, str)(cell) if cell != "" else None
    return rows


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path} ({first_line(exc)})") from exc


def _json_lines(path: Path, text: str) -> list[dict]:
    rows = []
    # Split on "\n" only: str.splitlines() would also split on U+2028 etc. inside JSON strings.
    for lineno, line in enumerate(text.split("\n"), 1):
        if len(line) > JSONL_MAX_LINE_CHARS:
            raise DataError(
                f"{path} line {lineno} is {len(line):,} characters long; a JSON line (one example) may hold at most "
                f"{JSONL_MAX_LINE_CHARS:,}: split or shorten that row"
            )
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path} line {lineno} is not valid JSON ({exc.msg} at column {exc.colno}); fix or remove that line"
            ) from exc
        if not isinstance(obj, dict):
            raise DataError(f"{path} line {lineno} is a JSON {type(obj).__name__}, not an object of columns")
        rows.append(plain(obj))
    return rows


def _json_file(path: Path) -> list[dict]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        first = next((line for line in text.split("\n") if line.strip()), "")
        try:
            is_lines = isinstance(json.loads(first), dict)
        except json.JSONDecodeError:
            is_lines = False
        if is_lines:
            return _json_lines(path, text)
        raise DataError(f"{path} is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from exc
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}; expected a list of objects or JSON lines")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(f"{path}: item {i} is a JSON {type(item).__name__}, not an object of columns")
    return [plain(item) for item in data]


def plain(value: Any) -> Any:
    """Numpy/pandas/arrow values -> plain Python (NaN and NA -> None)."""
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if type(value).__name__ in ("NAType", "NaTType"):
        return None
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return plain(value.tolist())
    return value
