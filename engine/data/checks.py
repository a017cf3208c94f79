"""The submit-time check of a run's data and reward functions (torch-free, cheap: the first rows of
each local source, read by config and split; hub ids are checked by the run itself).

Front ends call `check_run_data` before a run is queued, so a split or config that does not exist,
a column map naming a missing column, data of the wrong kind, or a reward function that does not
import, does not exist, cannot take the call or reads a column the data lacks is refused with one
message, and nothing is queued.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from engine.data.formats import check_kind, detect_format
from engine.data.prepare import check_dataset
from engine.data.sources import column_names, first_rows, load_split, shape_columns, spec_sources
from engine.registry import is_online
from engine.rewards.functions import STANDARD_KWARGS, check_call, load_reward_function
from engine.rewards.sources import parse_reward_source
from engine.tools import check_episode_code

SAMPLE_ROWS = 100


def _is_local(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and Path(os.fspath(path)).expanduser().exists()


def check_run_data(spec: Any, kind: str) -> None:
    """Refuse (DataError / CherryError, one message) what would fail when the run loads its data or first
    calls its reward functions."""
    columns: set[str] | None = set()
    for source in spec_sources(spec):
        if not _is_local(source.path):
            columns = None  # a hub id: its columns are known only once the run loads it
            continue
        what = "dataset" if not spec.dataset_mixture else f"dataset {source.name}"
        rows = shape_columns(load_split(source, source.split, max_rows=SAMPLE_ROWS, streaming=True), source)
        first = first_rows(rows)
        fmt, conversational = detect_format(first)
        check_kind(fmt, kind, list(first[0]), what)
        if source.test_split is not None:
            shape_columns(load_split(source, source.test_split, max_rows=SAMPLE_ROWS, streaming=True), source)
        if columns is not None:
            columns |= set(column_names(rows)) | ({"messages"} if conversational else set())
    if spec.eval_dataset:
        check_dataset(spec.eval_dataset, kind, "eval dataset")
    if is_online(spec.algorithm):
        check_reward_functions(spec, columns)
        check_episode_code(spec)  # the environment class and the tools load, with the right signatures


def check_reward_functions(spec: Any, columns: set[str] | None) -> None:
    """Every `module:function` / `file.py:function` reward imports, exists and takes the call; with the data's
    `columns` known, the columns it names are among them."""
    rewards = [spec.rewards] if isinstance(spec.rewards, str) else list(spec.rewards or [])
    for entry in rewards:
        kind, arg = parse_reward_source(entry)
        if kind != "python":
            continue
        fn = load_reward_function(arg)
        if columns is not None:
            # as the loop passes them: every column but `prompt` (it arrives as `prompts`), and the standard ones
            check_call(entry, fn, (columns - {"prompt"}) | set(STANDARD_KWARGS))
