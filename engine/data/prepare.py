"""`prepare`: a dataset, loaded, detected, normalised and tokenised for an algorithm, split into
train and eval; `check_dataset`, the cheap submit-time check of a local file."""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.data import cache
from engine.data.examples import ID_KEYS, Examples, from_arrow
from engine.data.formats import KIND_OF_FORMAT, PRESETS_FOR_KIND, check_kind, detect_format
from engine.data.load import load_rows, plain
from engine.data.normalise import Item, normalise
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


def _tokenise_batch(batch: dict[str, list], *, fmt: str, tokenizer: Any, opts: Options, where: str) -> dict[str, list]:
    """One batch of source rows (JSON text) -> one output row per item: its source row, why it was
    dropped ("" when kept), whether it was truncated, its id lists and the rest of the example as JSON."""
    items: list[Item] = []
    for src, text in zip(batch["src"], batch["row"]):
        items.extend(normalise(json.loads(text), src, fmt, opts.kind, where))
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
        out["rest"].append(json.dumps(ex) if ex is not None else "")
    return out


def _process(rows: list[dict], fmt: str, tokenizer: Any, opts: Options, where: str) -> tuple[Any, dict[str, int]]:
    """All rows of one source tokenised with `datasets`' batched map (several processes for large data):
    an Arrow table with a row per item (see `_tokenise_batch`), and the counts."""
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
    source = datasets.Dataset.from_dict({"src": list(range(len(rows))), "row": [json.dumps(row) for row in rows]})
    processes = tokenise_processes(len(rows))
    bars_were_on = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()  # no progress bars in a run's log
    try:
        mapped = source.map(
            _tokenise_batch,
            batched=True,
            batch_size=BATCH_ROWS,
            num_proc=processes if processes > 1 else None,
            remove_columns=source.column_names,
            features=features,
            fn_kwargs={"fmt": fmt, "tokenizer": tokenizer, "opts": opts, "where": where},
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


def _split(table: Any, keep: Any, kind: str) -> Examples:
    import numpy as np
    import pyarrow as pa

    return from_arrow(table.take(pa.array(np.flatnonzero(keep))), ID_KEYS[kind])


def _rows_of(source: Any, split: str, max_rows: int | None, what: str) -> list[dict]:
    if isinstance(source, (str, os.PathLike)):
        return load_rows(source, split, max_rows=max_rows)
    if not isinstance(source, list):
        raise DataError(f"{what} must be a path, a hub id or a list of row dicts, got {type(source).__name__}")
    rows = source[:max_rows] if max_rows is not None else source
    if not rows:
        raise DataError(f"{what} is empty (no rows); give a dataset with at least one row")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"{what} row {i} is a {type(row).__name__}, not a mapping of column names to values")
    return [plain(row) for row in rows]


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
    source: str | list[dict],
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
    `completion`, `label`; sft: `completion_ids`, `completion`; prompt: `answer` (str or None).
    Texts are the rendered, untruncated strings without the appended EOS.

    The train/eval split is drawn over source rows (seeded) before filtering, so the eval set does
    not depend on the length limits, and both halves of a split preference pair stay together.
    `source_split` / `eval_source_split` pick the split of a hub id or saved DatasetDict.
    `max_prompt_length=None` means no separate prompt limit (only `max_length`).

    With `cache_dir`, the result for local files is kept under `cache_dir/tokenised/` (engine.data.cache)
    and a later call with the same data contents, tokenizer and settings loads it instead of tokenising.
    """
    _check_args(kind, max_length, max_prompt_length, eval_split, overlong, max_rows)
    settings = {
        "kind": kind,
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "eval_split": eval_split,
        "seed": seed,
        "overlong": overlong,
        "max_rows": max_rows,
        "source_split": source_split,
        "eval_source_split": eval_source_split if eval_source is not None else None,
    }
    key = cache.cache_key([source, eval_source], tokenizer, settings) if cache_dir is not None else None
    cache_file = Path(cache_dir) / "tokenised" / f"{key}.npz" if key else None
    if cache_file is not None:
        hit = cache.load(cache_file)
        if hit is not None:
            payload, splits = hit
            log.info("tokenised data: loaded from the cache %s", cache_file)
            return PreparedData(**payload, train=splits["train"], eval=splits["eval"], cache_file=str(cache_file))
    data = _prepare(
        source,
        tokenizer,
        kind,
        max_length,
        max_prompt_length,
        eval_split,
        eval_source,
        seed,
        overlong,
        max_rows,
        source_split,
        eval_source_split,
    )
    if cache_file is not None:
        payload = {"format": data.format, "conversational": data.conversational, "stats": data.stats, "kind": kind}
        try:
            cache.save(cache_file, payload, {"train": data.train, "eval": data.eval})
            log.info("tokenised data: saved to the cache %s", cache_file)
        except OSError as err:  # a full or read-only disk costs the next run's time, not this run
            log.warning("tokenised data: could not write the cache %s (%s)", cache_file, err)
    return data


def _prepare(
    source: str | list[dict],
    tokenizer: Any,
    kind: str,
    max_length: int,
    max_prompt_length: int | None,
    eval_split: float,
    eval_source: str | list[dict] | None,
    seed: int,
    overlong: str,
    max_rows: int | None,
    source_split: str,
    eval_source_split: str,
) -> PreparedData:
    rows = _rows_of(source, source_split, max_rows, "dataset")
    fmt, conversational = detect_format(rows)
    check_kind(fmt, kind, list(rows[0]), "dataset")
    eval_rows = None
    if eval_source is not None:
        eval_rows = _rows_of(eval_source, eval_source_split, None, "eval dataset")
        eval_fmt, _ = detect_format(eval_rows)
        check_kind(eval_fmt, kind, list(eval_rows[0]), "eval dataset")

    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None and kind != "prompt":
        raise ModelError("the tokenizer has no eos_token; set tokenizer.eos_token so completions can end with it")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    opts = Options(kind, max_length, max_prompt_length, overlong, eos_id, bos_id, appends_eos(tokenizer))

    import numpy as np

    built, stats = _process(rows, fmt, tokenizer, opts, "row")
    kept = _drop_reasons(built) == ""
    if eval_rows is None:
        n_eval = _eval_count(len(rows), float(eval_split))
        in_eval = np.zeros(len(rows), dtype=bool)
        in_eval[random.Random(seed).sample(range(len(rows)), n_eval)] = True
        in_eval = in_eval[built.column("src").to_numpy()]
        train, evals = _split(built, kept & ~in_eval, kind), _split(built, kept & in_eval, kind)
    else:
        eval_built, eval_stats = _process(eval_rows, eval_fmt, tokenizer, opts, "eval row")
        if not eval_stats["kept"]:
            raise _nothing_left(eval_stats, "eval", opts)
        for key in STAT_KEYS:
            stats[key] += eval_stats[key]
        eval_kept = _drop_reasons(eval_built) == ""
        train, evals = _split(built, kept, kind), _split(eval_built, eval_kept, kind)
    if not len(train):
        raise _nothing_left(stats, "training", opts)
    stats["train"], stats["eval"] = len(train), len(evals)
    return PreparedData(format=fmt, conversational=conversational, train=train, eval=evals, stats=stats, kind=kind)
