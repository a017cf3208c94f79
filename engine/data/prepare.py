"""`prepare`: a dataset, loaded, detected, normalised and tokenised for an algorithm, split into
train and eval; `check_dataset`, the cheap submit-time check of a local file."""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.data import cache
from engine.data.examples import ID_KEYS, Examples, from_arrow
from engine.data.formats import KIND_OF_FORMAT, PRESETS_FOR_KIND, check_kind, detect_format
from engine.data.load import load_rows, plain
from engine.data.normalise import Item, normalise
from engine.data.sources import DataSource, fingerprint, first_rows, load_split, shape_columns, take_weight
from engine.data.tokenise import Options, TokenQueue, appends_eos, build_example, render
from engine.errors import DataError, ModelError, SpecError

log = logging.getLogger("cherry.engine")

STAT_KEYS = ("rows", "kept", "dropped_empty", "dropped_identical", "dropped_overlong", "truncated", "train", "eval")


@dataclass
class PreparedData:
    format: str  # one of FORMATS (of the training source)
    conversational: bool
    train: Examples
    eval: Examples
    stats: dict[str, int]  # STAT_KEYS
    kind: str = ""  # the kind the examples were built for (may differ from the format's own kind)
    cache_file: str | None = None  # the tokenised-data cache file these examples were loaded from, if any
    sources: list[dict] = field(default_factory=list)  # per source: what was taken of it, and its counts

    def source_lines(self) -> list[str]:
        """The data report's line for each source: rows taken and kept, what was dropped, its column map."""
        lines = []
        for s in self.sources:
            weight = f" (weight {s['weight']:g}: {s['taken']:,} of {s['available']:,} rows)" if s["weight"] < 1 else ""
            mapped = ", ".join(f"{k} <- {v}" for k, v in s["column_map"].items())
            lines.append(
                f"{s['name']}{weight}, format {s['format']}: kept {s['kept']:,} of {s['rows']:,} -> "
                f"{s['train']:,} train / {s['eval']:,} eval"
                + (f" (eval from split {s['test_split']})" if s["test_split"] else "")
                + f"; dropped {s['dropped_identical']:,} identical, {s['dropped_empty']:,} empty, "
                f"{s['dropped_overlong']:,} over-long" + (f"; columns {mapped}" if mapped else "")
            )
        return lines

    def summary(self) -> str:
        s = self.stats
        name = self.format + (" (conversational)" if self.conversational else "")
        if self.kind and self.kind != KIND_OF_FORMAT.get(self.format):
            name += f" as {self.kind}"
        return (
            f"{name}: {s['rows']:,} rows -> {s['train']:,} train / {s['eval']:,} eval; "
            f"dropped {s['dropped_identical']:,} identical, {s['dropped_empty']:,} empty, "
            f"{s['dropped_overlong']:,} over-long; truncated {s['truncated']:,}"
        )


def check_dataset(source: str, kind: str, what: str = "dataset", *, sample_rows: int = 100) -> str | None:
    """Check a local dataset's format against the data `kind` an algorithm needs, from its first rows.

    Cheap (no tokenizer, no torch): front ends call it before a run is queued, so a wrong file is
    refused at submit time. Hub ids are not fetched here (the run checks them); returns the format.
    """
    path = Path(os.fspath(source)).expanduser()
    if not path.exists():
        return None
    rows = load_rows(str(path), max_rows=sample_rows)
    fmt, _ = detect_format(rows)
    check_kind(fmt, kind, list(rows[0]), what)
    return fmt


# Tokenising processes: one below this many rows (starting processes costs more than it saves).
PARALLEL_ROWS = 10_000
MAX_PROCESSES = 8
BATCH_ROWS = 1000  # rows per batched call: the tokenizer encodes a batch's texts in one call


def tokenise_processes(rows: int) -> int:
    """How many processes tokenise `rows` rows: one per usable core (at most MAX_PROCESSES) from PARALLEL_ROWS."""
    if rows < PARALLEL_ROWS:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, MAX_PROCESSES))


def _tokenise_batch(
    batch: dict[str, list], indices: list[int], *, fmt: str, tokenizer: Any, opts: Options, where: str, json_rows: bool
) -> dict[str, list]:
    """One batch of source rows (JSON text, or a `datasets` table's columns) -> one output row per item:
    its source row, why it was dropped ("" when kept), whether it was truncated, its id lists and the
    rest of the example as JSON."""
    if json_rows:
        rows = [json.loads(text) for text in batch["row"]]
    else:
        names = list(batch)
        rows = [plain(dict(zip(names, values))) for values in zip(*(batch[name] for name in names))]
    items: list[Item] = []
    for src, row in zip(indices, rows):
        items.extend(normalise(row, src, fmt, opts.kind, where))
    queue = TokenQueue(tokenizer)
    render(items, tokenizer, queue, where)
    queue.run()
    id_keys = ID_KEYS[opts.kind]
    out: dict[str, list] = {name: [] for name in ("src", "drop", "truncated", "rest", *id_keys)}
    for item in items:
        counts = {"dropped_overlong": 0, "truncated": 0}
        ex = None if item.drop else build_example(item, queue, opts, counts)
        out["src"].append(item.src)
        out["drop"].append(item.drop or ("overlong" if ex is None else ""))
        out["truncated"].append(bool(counts["truncated"]))
        for key in id_keys:
            out[key].append(ex.pop(key, None) if ex is not None else None)
        if ex is not None:
            del ex["index"]  # an example's index is its position in its split (Examples)
        out["rest"].append(json.dumps(ex, default=str) if ex is not None else "")
    return out


def _process(rows: Any, fmt: str, tokenizer: Any, opts: Options, where: str) -> tuple[Any, dict[str, int]]:
    """All rows of one source (a list of dicts or a `datasets.Dataset`, read in batches where it lies)
    tokenised with `datasets`' batched map (several processes for large data): an Arrow table with a
    row per item (see `_tokenise_batch`), and the counts."""
    import datasets

    id_keys = ID_KEYS[opts.kind]
    features = datasets.Features(
        {
            "src": datasets.Value("int64"),
            "drop": datasets.Value("string"),
            "truncated": datasets.Value("bool"),
            "rest": datasets.Value("large_string"),
            **{key: datasets.List(datasets.Value("int32")) for key in id_keys},
        }
    )
    json_rows = isinstance(rows, list)
    source = datasets.Dataset.from_dict({"row": [json.dumps(row) for row in rows]}) if json_rows else rows
    processes = tokenise_processes(len(rows))
    bars_were_on = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()  # no progress bars in a run's log
    try:
        mapped = source.map(
            _tokenise_batch,
            batched=True,
            with_indices=True,
            batch_size=BATCH_ROWS,
            num_proc=processes if processes > 1 else None,
            remove_columns=source.column_names,
            features=features,
            fn_kwargs={"fmt": fmt, "tokenizer": tokenizer, "opts": opts, "where": where, "json_rows": json_rows},
            keep_in_memory=True,
            new_fingerprint="cherry-tokenise",  # nothing is cached by `datasets` itself: no need to hash the tokenizer
        )
    finally:
        if bars_were_on:
            datasets.utils.logging.enable_progress_bar()
    table = mapped.data.table
    drop = _drop_reasons(table)
    stats = dict.fromkeys(STAT_KEYS, 0)
    stats["rows"] = len(table)
    for reason in ("empty", "identical", "overlong"):
        stats[f"dropped_{reason}"] = int((drop == reason).sum())
    stats["truncated"] = int(table.column("truncated").to_numpy().sum())
    stats["kept"] = int((drop == "").sum())
    return table, stats


def _drop_reasons(table: Any) -> Any:
    import numpy as np

    return np.asarray(table.column("drop").to_pylist(), dtype=object)


def _take(table: Any, keep: Any) -> Any:
    import numpy as np
    import pyarrow as pa

    return table.take(pa.array(np.flatnonzero(keep), type=pa.int64()))


def _joined(tables: list[Any], kind: str) -> Examples:
    import pyarrow as pa

    return from_arrow(pa.concat_tables(tables) if len(tables) > 1 else tables[0], ID_KEYS[kind])


def as_sources(source: Any, split: str) -> list[DataSource]:
    """`prepare`'s source as data sources: a path or hub id, rows, one DataSource or a mixture's list."""
    if isinstance(source, DataSource):
        return [source]
    if isinstance(source, list) and source and all(isinstance(s, DataSource) for s in source):
        return list(source)
    if isinstance(source, (str, os.PathLike)):
        return [DataSource(path=os.fspath(source), split=split)]
    if not isinstance(source, list):
        raise DataError(f"dataset must be a path, a hub id or a list of row dicts, got {type(source).__name__}")
    return [DataSource(path=source, split=split)]


def _rows_of(source: DataSource, split: str, max_rows: int | None, what: str) -> Any:
    """The rows of one split of a source, columns kept and renamed: a list of dicts or a `datasets.Dataset`."""
    if isinstance(source.path, list):
        rows = source.path[:max_rows] if max_rows is not None else source.path
        if not rows:
            raise DataError(f"{what} is empty (no rows); give a dataset with at least one row")
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise DataError(f"{what} row {i} is a {type(row).__name__}, not a mapping of column names to values")
        data = [plain(row) for row in rows]
    else:
        data = load_split(source, split, max_rows=max_rows)
    return shape_columns(data, source)


def _check_args(
    kind: str, max_length: Any, max_prompt_length: Any, eval_split: Any, overlong: Any, max_rows: Any
) -> None:
    if kind not in PRESETS_FOR_KIND:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(PRESETS_FOR_KIND)}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(max_length) or max_length < 2:
        raise SpecError(f"max_length must be an integer >= 2, got {max_length!r}")
    if max_prompt_length is not None and (not is_int(max_prompt_length) or max_prompt_length < 1):
        raise SpecError(f"max_prompt_length must be a positive integer (or None), got {max_prompt_length!r}")
    if isinstance(eval_split, bool) or not isinstance(eval_split, (int, float)) or not 0 <= eval_split < 1:
        raise SpecError(f"eval_split must be a fraction in [0, 1), got {eval_split!r}")
    if overlong not in ("truncate", "drop"):
        raise SpecError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
    if max_rows is not None and (not is_int(max_rows) or max_rows < 1):
        raise SpecError(f"max_rows must be a positive integer (or None), got {max_rows!r}")


def _eval_count(n: int, fraction: float) -> int:
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, math.floor(n * fraction + 0.5)))


def _nothing_left(stats: dict[str, int], what: str, opts: Options) -> DataError:
    return DataError(
        f"no {what} rows left after filtering {stats['rows']:,} rows: dropped {stats['dropped_empty']:,} with an "
        f"empty prompt or completion, {stats['dropped_identical']:,} with chosen == rejected, "
        f"{stats['dropped_overlong']:,} over-long (max_length={opts.max_length}, "
        f"max_prompt_length={opts.max_prompt_length}, overlong='{opts.overlong}'); fix the data, raise the "
        "length limits or use overlong='truncate'"
    )


def prepare(
    source: str | list[dict] | DataSource | list[DataSource],
    tokenizer: Any,
    *,
    kind: str,
    max_length: int = 512,
    max_prompt_length: int | None = 256,
    eval_split: float = 0.05,
    eval_source: str | list[dict] | None = None,
    seed: int = 0,
    overlong: str = "truncate",
    max_rows: int | None = None,
    source_split: str = "train",
    eval_source_split: str = "test",
    cache_dir: str | Path | None = None,
) -> PreparedData:
    """Load, detect, normalise and tokenise a dataset for an algorithm that needs `kind` data.

    Every example has `index` (its position in train or eval), `prompt_ids`, `prompt` (rendered
    text) and `messages` (the prompt as a message list, None for plain text), plus per kind:
    preference: `chosen_ids`, `rejected_ids`, `chosen`, `rejected`; unpaired: `completion_ids`,
    `completion`, `label`; sft: `completion_ids`, `completion`; prompt: `answer` (str or None) and
    `columns` (the row's other columns, as they are, for reward functions).
    Texts are the rendered, untruncated strings without the appended EOS.

    `source` is a path or hub id (read at `source_split`), rows, or engine.data.sources.DataSource(s):
    each is read by config and split, its columns kept and renamed, the seeded fraction `weight` of
    its rows taken, then detected, checked and tokenised on its own. Its eval rows are its
    `test_split`, else `eval_source` (read at `eval_source_split`) when given, else the held-out
    fraction `eval_split`, drawn over source rows (seeded) before filtering, so the eval set does not
    depend on the length limits, and both halves of a split preference pair stay together.
    `max_prompt_length=None` means no separate prompt limit (only `max_length`).

    With `cache_dir`, the result is kept under `cache_dir/tokenised/` (engine.data.cache) and a later
    call with the same data, tokenizer and settings loads it instead of tokenising.
    """
    _check_args(kind, max_length, max_prompt_length, eval_split, overlong, max_rows)
    sources = as_sources(source, source_split)
    settings = {
        "kind": kind,
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "eval_split": eval_split,
        "seed": seed,
        "overlong": overlong,
        "max_rows": max_rows,
        "sources": [s.describe() for s in sources],
        "eval_source_split": eval_source_split if eval_source is not None else None,
    }
    key = None
    if cache_dir is not None:
        prints = [fingerprint(s, s.split) for s in sources] + [fingerprint(s, s.test_split) for s in sources]
        if eval_source is not None:
            prints.append(fingerprint(as_sources(eval_source, eval_source_split)[0], eval_source_split))
        key = cache.cache_key(prints, tokenizer, settings)
    cache_file = Path(cache_dir) / "tokenised" / f"{key}.npz" if key else None
    if cache_file is not None:
        hit = cache.load(cache_file)
        if hit is not None:
            payload, splits = hit
            log.info("tokenised data: loaded from the cache %s", cache_file)
            return PreparedData(**payload, train=splits["train"], eval=splits["eval"], cache_file=str(cache_file))
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None and kind != "prompt":
        raise ModelError("the tokenizer has no eos_token; set tokenizer.eos_token so completions can end with it")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    opts = Options(kind, max_length, max_prompt_length, overlong, eos_id, bos_id, appends_eos(tokenizer))
    evals = None
    if eval_source is not None:
        evals = _eval_table(as_sources(eval_source, eval_source_split)[0], eval_source_split, tokenizer, opts)
    data = _prepare(sources, tokenizer, opts, float(eval_split), evals, seed, max_rows)
    if cache_file is not None:
        payload = {
            "format": data.format,
            "conversational": data.conversational,
            "stats": data.stats,
            "kind": kind,
            "sources": data.sources,
        }
        try:
            cache.save(cache_file, payload, {"train": data.train, "eval": data.eval})
            log.info("tokenised data: saved to the cache %s", cache_file)
        except OSError as err:  # a full or read-only disk costs the next run's time, not this run
            log.warning("tokenised data: could not write the cache %s (%s)", cache_file, err)
    return data


def _loaded(source: DataSource, split: str, max_rows: int | None, what: str, kind: str) -> tuple[Any, str, bool]:
    """(rows, format, conversational) of one split of a source, its format checked against `kind`."""
    rows = _rows_of(source, split, max_rows, what)
    first = first_rows(rows)
    fmt, conversational = detect_format(first)
    check_kind(fmt, kind, list(first[0]), what)
    return rows, fmt, conversational


def _eval_table(
    source: DataSource, split: str, tokenizer: Any, opts: Options, what: str = "eval dataset"
) -> tuple[Any, dict[str, int]]:
    """The kept eval rows of one split of a source (a test split or `eval_source`), and their counts."""
    rows, fmt, _ = _loaded(source, split, None, what, opts.kind)
    built, stats = _process(rows, fmt, tokenizer, opts, "eval row")
    if not stats["kept"]:
        raise _nothing_left(stats, "eval" if what == "eval dataset" else what, opts)
    return _take(built, _drop_reasons(built) == ""), stats


def _prepare(
    sources: list[DataSource],
    tokenizer: Any,
    opts: Options,
    eval_split: float,
    evals: tuple[Any, dict[str, int]] | None,
    seed: int,
    max_rows: int | None,
) -> PreparedData:
    kind = opts.kind
    stats = dict.fromkeys(STAT_KEYS, 0)
    train_tables, eval_tables, reports, formats = [], [], [], []
    for source in sources:
        what = "dataset" if len(sources) == 1 else f"dataset {source.name}"
        rows, fmt, conversational = _loaded(source, source.split, max_rows, what, kind)
        available = len(rows)
        rows = take_weight(rows, source.weight, seed)
        formats.append((fmt, conversational))
        built, own = _process(rows, fmt, tokenizer, opts, "row" if len(sources) == 1 else f"{source.name} row")
        kept = _drop_reasons(built) == ""
        if source.test_split is not None:
            table, test_stats = _eval_table(
                source, source.test_split, tokenizer, opts, f"{what} split {source.test_split}"
            )
            train, evaluation = _take(built, kept), table
            for key in ("rows", "kept", "dropped_empty", "dropped_identical", "dropped_overlong", "truncated"):
                own[key] += test_stats[key]
        elif evals is not None:
            train, evaluation = _take(built, kept), None
        else:
            train, evaluation = _held_out(built, kept, len(rows), eval_split, seed)
        train_tables.append(train)
        if evaluation is not None:
            eval_tables.append(evaluation)
        own["train"], own["eval"] = len(train), len(evaluation) if evaluation is not None else 0
        for key in STAT_KEYS:
            stats[key] += own[key]
        reports.append({**source.describe(), "available": available, "taken": len(rows), "format": fmt, **own})
    if evals is not None:
        eval_tables.append(evals[0])
        for key in ("rows", "kept", "dropped_empty", "dropped_identical", "dropped_overlong", "truncated"):
            stats[key] += evals[1][key]
        stats["eval"] = len(evals[0])
    if not stats["train"]:
        raise _nothing_left(stats, "training", opts)
    fmt, conversational = formats[0]
    return PreparedData(
        format=fmt,
        conversational=conversational,
        train=_joined(train_tables, kind),
        eval=_joined(eval_tables or [_take(train_tables[0], [])], kind),
        stats=stats,
        kind=kind,
        sources=reports,
    )


def _held_out(built: Any, kept: Any, n_rows: int, fraction: float, seed: int) -> tuple[Any, Any]:
    """(train, eval) tables: the seeded `fraction` of the source rows (before filtering) is eval."""
    import numpy as np

    in_eval = np.zeros(n_rows, dtype=bool)
    in_eval[random.Random(seed).sample(range(n_rows), _eval_count(n_rows, fraction))] = True
    in_eval = in_eval[built.column("src").to_numpy()]
    return _take(built, kept & ~in_eval), _take(built, kept & in_eval)
