"""Load, detect, normalise and tokenise datasets.

Pipeline: `load_rows` (local file, saved `datasets` directory or hub id -> plain dicts) ->
`detect_format` (from the column names and the first row's value types) -> normalise each row to a
prompt and its completion(s) -> render conversational rows with the tokenizer's chat template ->
tokenise prompts and completions separately, in batches -> truncate / drop -> split train/eval.

Examples are plain dicts (see `prepare`); every completion ends with the tokenizer's EOS unless it
was truncated. `engine.batching` turns them into padded tensors.

Errors a user can cause are `DataError`s (bad parameter values: `SpecError`) with one-line messages;
row numbers in them count from 0, like `dataset[i]`; file line numbers count from 1, like an editor.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import DataError, ModelError, SpecError
from engine.registry import DATA_KINDS, algorithms_for
from engine.spec import looks_local

# ----------------------------------------------------------------------------------------------
# Formats and kinds

FORMATS: dict[str, str] = {
    "preference": "prompt, chosen, rejected (explicit prompt)",
    "preference_implicit": "chosen, rejected (full transcripts sharing a prompt prefix, hh-rlhf style)",
    "unpaired": "prompt, completion, label (boolean)",
    "sft": "prompt, completion",
    "messages": "messages (a list of {role, content})",
    "text": "text",
    "prompt_only": "prompt (+ optional answer)",
}

# Required columns of each format, in detection order (most specific first).
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "preference": ("prompt", "chosen", "rejected"),
    "preference_implicit": ("chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "sft": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
    "prompt_only": ("prompt",),
}

KIND_OF_FORMAT: dict[str, str] = {
    "preference": "preference",
    "preference_implicit": "preference",
    "unpaired": "unpaired",
    "sft": "sft",
    "messages": "sft",
    "text": "sft",
    "prompt_only": "prompt",
}

PRESETS_FOR_KIND: dict[str, list[str]] = {kind: algorithms_for(kind) for kind in DATA_KINDS}

# Formats each kind accepts (beyond its own, with a conversion).
_ACCEPTS: dict[str, tuple[str, ...]] = {
    "preference": ("preference", "preference_implicit"),
    "unpaired": ("unpaired", "preference", "preference_implicit"),
    "sft": ("sft", "messages", "text", "preference", "preference_implicit"),
    "prompt": ("prompt_only", "preference", "preference_implicit", "unpaired", "sft", "messages"),
}

_KIND_NEEDS: dict[str, str] = {
    "preference": "prompt/chosen/rejected pairs (or chosen/rejected transcripts sharing a prompt)",
    "unpaired": "prompt/completion/label rows (or preference pairs, split into a good and a bad row)",
    "sft": "prompt/completion, messages or text rows (or preference pairs, trained on the chosen side)",
    "prompt": "a prompt column (or messages, or preference pairs)",
}

# Text-bearing columns of each format (values: a string or a list of messages).
_TEXT_COLUMNS: dict[str, tuple[str, ...]] = {
    "preference": ("prompt", "chosen", "rejected"),
    "preference_implicit": ("chosen", "rejected"),
    "unpaired": ("prompt", "completion"),
    "sft": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
    "prompt_only": ("prompt",),
}

_EXPECTED_COLUMNS = ("prompt", "chosen", "rejected", "completion", "label", "messages", "text", "answer")
_ALIASES = {
    "question": "prompt", "instruction": "prompt", "query": "prompt", "input": "prompt",
    "response": "completion", "output": "completion",
    "conversations": "messages", "conversation": "messages", "chat": "messages",
    "dialog": "messages", "dialogue": "messages",
    "preferred": "chosen", "accepted": "chosen", "winner": "chosen",
    "dispreferred": "rejected", "loser": "rejected",
    "content": "text",
}

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv")
STAT_KEYS = ("rows", "kept", "dropped_empty", "dropped_identical", "dropped_overlong", "truncated", "train", "eval")
_TOKENIZE_CHUNK = 4096
_HH_ASSISTANT = re.compile(r"(?:^|\n)Assistant:")


@dataclass
class PreparedData:
    format: str  # one of FORMATS (of the training source)
    conversational: bool
    train: list[dict]
    eval: list[dict]
    stats: dict[str, int]  # STAT_KEYS
    kind: str = ""  # the kind the examples were built for (may differ from the format's own kind)

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


# ----------------------------------------------------------------------------------------------
# Loading


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
    _check_kind(fmt, kind, list(rows[0]), what)
    return fmt


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    msg = lines[0] if lines else ""
    msg = msg if len(msg) <= 200 else msg[:197] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _load_hub(source: str, split: str, max_rows: int | None) -> list[dict]:
    try:
        import datasets

        ds = datasets.load_dataset(source, split=split)
    except Exception as exc:  # noqa: BLE001 - any hub/network/builder failure is a user-facing data error
        raise DataError(
            f"could not load '{source}' (split '{split}') as a Hugging Face hub dataset ({_first_line(exc)}); "
            "check the id and that this machine can reach the hub, or download it and pass a local "
            ".jsonl/.json/.parquet/.csv file or a saved dataset directory"
        ) from exc
    return _dataset_rows(ds, max_rows)


def _dataset_rows(ds: Any, max_rows: int | None) -> list[dict]:
    if max_rows is not None and len(ds) > max_rows:
        ds = ds.select(range(max_rows))
    return [_plain(row) for row in ds.to_list()]


def _load_dir(path: Path, split: str, max_rows: int | None) -> list[dict]:
    if any((path / name).exists() for name in ("dataset_dict.json", "state.json", "dataset_info.json")):
        import datasets

        try:
            obj = datasets.load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"could not read saved dataset directory {path} ({_first_line(exc)})") from exc
        if isinstance(obj, datasets.DatasetDict):
            if split not in obj:
                raise DataError(
                    f"saved dataset {path} has no split '{split}'; its splits are: {', '.join(obj)}"
                )
            obj = obj[split]
        return _dataset_rows(obj, max_rows)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_FILE_SUFFIXES)
    named = [p for p in files if p.stem == split]
    if len(named) == 1:
        return _load_file(named[0])
    if len(files) == 1:
        return _load_file(files[0])
    found = ", ".join(p.name for p in files) or "no data files"
    raise DataError(
        f"directory {path} is not a saved dataset (no dataset_dict.json or state.json) and has no single "
        f"data file for split '{split}' (found: {found}); pass the data file itself"
    )


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
            raise DataError(f"{path} is not a readable Parquet file ({_first_line(exc)})") from exc
        return [_plain(row) for row in table.to_pylist()]
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
        raise DataError(f"{path} is not a readable {what} file ({_first_line(exc)})") from exc
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
        raise DataError(f"cannot read {path} ({_first_line(exc)})") from exc


def _json_lines(path: Path, text: str) -> list[dict]:
    rows = []
    # Split on "\n" only: str.splitlines() would also split on U+2028 etc. inside JSON strings.
    for lineno, line in enumerate(text.split("\n"), 1):
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
        rows.append(_plain(obj))
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
    return [_plain(item) for item in data]


def _plain(value: Any) -> Any:
    """Numpy/pandas/arrow values -> plain Python (NaN and NA -> None)."""
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if type(value).__name__ in ("NAType", "NaTType"):
        return None
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _plain(value.tolist())
    return value


# ----------------------------------------------------------------------------------------------
# Detection


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value
    )


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _near_misses(columns: list[str]) -> list[tuple[str, str]]:
    """(found column, expected column) pairs where a found column looks like a misspelt expected one."""
    present = set(columns)
    out = []
    for col in columns:
        low = col.lower()
        if col in _EXPECTED_COLUMNS or low.endswith(("_id", "_ids")):
            continue
        target = _ALIASES.get(low)
        if target is None and low in _EXPECTED_COLUMNS:
            target = low
        if target is None:
            close = difflib.get_close_matches(low, _EXPECTED_COLUMNS, n=1, cutoff=0.75)
            target = close[0] if close else None
        if target is None:
            target = next((e for e in ("chosen", "rejected", "completion", "prompt", "messages") if e in low), None)
        if target is not None and target not in present and (col, target) not in out:
            out.append((col, target))
    return out


def _hint_text(columns: list[str]) -> str:
    misses = _near_misses(columns)
    if not misses:
        return ""
    return "; did you mean " + ", ".join(f"'{exp}' instead of '{col}'" for col, exp in misses) + "?"


def _expected_text() -> str:
    parts = []
    for name, cols in FORMAT_COLUMNS.items():
        extra = " [, answer]" if name == "prompt_only" else ""
        parts.append(f"{name} ({', '.join(cols)}{extra})")
    return "; ".join(parts)


def _no_format_error(columns: list[str], reason: str = "") -> DataError:
    found = ", ".join(columns) if columns else "none"
    return DataError(
        f"no known dataset format matches the columns found: {found}{reason}{_hint_text(columns) or '.'} "
        f"Expected the columns of one of: {_expected_text()} (extra columns are ignored)"
    )


def detect_format(rows: list[dict]) -> tuple[str, bool]:
    """(format, conversational) from the column names and the first row's value types."""
    if not rows:
        raise DataError("the dataset has no rows")
    first = rows[0]
    if not isinstance(first, Mapping):
        raise DataError(f"row 0 is a {type(first).__name__}, not a mapping of column names to values")
    columns = [str(c) for c in first]
    cols = set(columns)
    fmt = None
    for name, required in FORMAT_COLUMNS.items():
        if set(required) <= cols:
            fmt = name
            break
    if fmt is None:
        raise _no_format_error(columns)
    for col in _TEXT_COLUMNS[fmt]:
        _check_text_value(first.get(col), col, 0, "row", messages_only=fmt == "messages", text_only=fmt == "text")
    if fmt == "preference_implicit":
        prompt_like = [col for col, exp in _near_misses(columns) if exp == "prompt"]
        if prompt_like or not _has_shared_prompt(first["chosen"], first["rejected"]):
            why = (
                " (chosen and rejected are present without a prompt column"
                + ("" if prompt_like else ", and they share no prompt prefix, so they are not implicit-prompt pairs")
                + ")"
            )
            raise _no_format_error(columns, why)
    if fmt == "messages":
        conversational = True
    else:
        conversational = any(isinstance(first.get(col), list) for col in _TEXT_COLUMNS[fmt])
    return fmt, conversational


def _has_shared_prompt(chosen: Any, rejected: Any) -> bool:
    chosen = "" if chosen is None else chosen
    rejected = "" if rejected is None else rejected
    if isinstance(chosen, str) and isinstance(rejected, str):
        return bool(_split_implicit(chosen, rejected)[0].strip())
    if isinstance(chosen, list) and isinstance(rejected, list):
        return bool(_split_last_assistant(chosen)[0])
    return False


def _check_text_value(
    value: Any, col: str, i: int, where: str, *, messages_only: bool = False, text_only: bool = False
) -> str | list:
    if value is None:
        return [] if messages_only else ""
    if isinstance(value, str) and not messages_only:
        return value
    if not text_only and _is_messages(value):
        return value
    expected = (
        "a list of {role, content} messages" if messages_only
        else "a string" if text_only
        else "a string or a list of {role, content} messages"
    )
    raise DataError(f"{where} {i}: column '{col}' holds {_describe(value)}; expected {expected}")


# ----------------------------------------------------------------------------------------------
# Normalisation


def _split_last_assistant(messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """(messages before the last assistant turn, [that turn]); ([...all], []) if there is none."""
    for j in range(len(messages) - 1, -1, -1):
        if messages[j].get("role") == "assistant":
            return messages[:j], [messages[j]]
    return messages, []


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _split_implicit(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen rest, rejected rest) for two transcripts sharing a prompt prefix.

    The prompt is the longest common prefix. If it contains an hh-rlhf "Assistant:" turn marker the
    cut goes right after the last one; otherwise it is backed off to a whitespace boundary so no
    word is split, and whitespace at the boundary goes to the completions.
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    marker = None
    for marker in _HH_ASSISTANT.finditer(chosen, 0, n):
        pass
    if marker is not None:
        cut = marker.end()
    else:
        cut = n
        splits_word = cut > 0 and _is_word(chosen[cut - 1]) and any(
            cut < len(s) and _is_word(s[cut]) for s in (chosen, rejected)
        )
        if splits_word:
            while cut > 0 and not chosen[cut - 1].isspace():
                cut -= 1
        while cut > 0 and chosen[cut - 1].isspace():
            cut -= 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _is_empty(value: str | list) -> bool:
    if isinstance(value, str):
        return not value.strip()
    for m in value:
        content = m.get("content")
        if content is None:
            continue
        if not isinstance(content, str) or content.strip():
            return False
    return True


def _label(value: Any, i: int, where: str, column: str = "label") -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise DataError(
        f"{where} {i}: '{column}' must be a boolean (true/false, or 0/1), got {_describe(value)}"
    )


@dataclass
class _Item:
    src: int  # source row number
    prompt: str | list  # str (plain) or message list (conversational)
    comps: list  # completions: same type as prompt
    label: bool | None = None
    answer: str | None = None
    margin: float | None = None  # optional per-pair reward margin (Llama 2 rating margins)
    safety: bool | None = None  # optional safety tag of the prompt (Llama 2 helpfulness + safety gating)
    multi_turn: bool = False  # SFT on a conversation: loss on every assistant turn, not only the last
    segments: list = field(default_factory=list)  # (token ref, is_assistant) pieces of a multi-turn completion
    drop: str | None = None  # "identical" | "empty"
    texts: tuple = ()  # filled when rendering: (prompt_text, [completion texts])
    refs: tuple = ()  # token refs: (prompt_ref, [completion refs])


def _with_prompt(prompt: str | list, comps: list, i: int, where: str) -> tuple[str | list, list]:
    """Pair a prompt with completions; if any is a message list, make them all message lists."""
    if not isinstance(prompt, list) and not any(isinstance(c, list) for c in comps):
        return prompt, comps
    if isinstance(prompt, str) and all(isinstance(c, list) for c in comps):
        splits = [_split_last_assistant(c) for c in comps]
        if splits[0][0]:
            # The completions carry the whole conversation (UltraFeedback style): the prompt
            # column is a plain copy of the user turn, so the conversation before the last
            # assistant turn is the prompt.
            if any(s[0] != splits[0][0] for s in splits[1:]):
                raise DataError(
                    f"{where} {i}: the conversations in the completion columns differ before their last "
                    "assistant turn, so they do not share one prompt"
                )
            return splits[0][0], [s[1] for s in splits]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}] if prompt.strip() else []
    comps = [
        c if isinstance(c, list) else ([{"role": "assistant", "content": c}] if c.strip() else [])
        for c in comps
    ]
    return prompt, comps


def _implicit(chosen: str | list, rejected: str | list, i: int, where: str) -> tuple[str | list, list]:
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt, c, r = _split_implicit(chosen, rejected)
        return prompt, [c, r]
    if isinstance(chosen, list) and isinstance(rejected, list):
        cp, cl = _split_last_assistant(chosen)
        rp, rl = _split_last_assistant(rejected)
        if cp != rp:
            raise DataError(
                f"{where} {i}: chosen and rejected conversations differ before their last assistant turn, "
                "so the shared prompt cannot be inferred; add an explicit prompt column"
            )
        return cp, [cl, rl]
    raise DataError(f"{where} {i}: one of chosen/rejected is plain text and the other a list of messages")


def _margin(value: Any, i: int, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where} {i}: 'margin' must be a number (a reward margin for the pair), got {_describe(value)}")
    return float(value)


def _normalise(row: Mapping, i: int, fmt: str, kind: str, where: str) -> list[_Item]:
    def get(col: str) -> str | list:
        return _check_text_value(row.get(col), col, i, where)

    identical = False
    if fmt in ("preference", "preference_implicit"):
        chosen, rejected = get("chosen"), get("rejected")
        identical = kind in ("preference", "unpaired") and chosen == rejected
        if identical:
            prompt, comps = "", [chosen, rejected]  # not rendered
        elif fmt == "preference":
            prompt, comps = _with_prompt(get("prompt"), [chosen, rejected], i, where)
        else:
            prompt, comps = _implicit(chosen, rejected, i, where)
    elif fmt in ("unpaired", "sft"):
        prompt, comps = _with_prompt(get("prompt"), [get("completion")], i, where)
    elif fmt == "messages" and kind == "sft":
        # Everything from the first assistant turn on is the completion; only assistant turns carry loss.
        messages = _check_text_value(row.get("messages"), "messages", i, where, messages_only=True)
        first = next((j for j, m in enumerate(messages) if m.get("role") == "assistant"), len(messages))
        prompt, comps = messages[:first], [messages[first:]]
    elif fmt == "messages":
        messages = _check_text_value(row.get("messages"), "messages", i, where, messages_only=True)
        prompt, last = _split_last_assistant(messages)
        comps = [last]
    elif fmt == "text":
        prompt, comps = "", [_check_text_value(row.get("text"), "text", i, where, text_only=True)]
    else:  # prompt_only
        prompt, comps = get("prompt"), []

    if kind == "prompt":
        answer = row.get("answer")
        items = [_Item(i, prompt, [], answer=None if answer is None else str(answer))]
    elif kind == "unpaired" and fmt != "unpaired":
        items = [_Item(i, prompt, [comps[0]], label=True), _Item(i, prompt, [comps[1]], label=False)]
    elif kind == "unpaired":
        items = [_Item(i, prompt, comps, label=_label(row.get("label"), i, where))]
    elif kind == "sft":
        items = [_Item(i, prompt, comps[:1], multi_turn=fmt == "messages")]
    else:
        items = [_Item(i, prompt, comps, margin=_margin(row.get("margin"), i, where))]

    safety = row.get("safety")
    if safety is not None:
        safety = _label(safety, i, where, column="safety")
    for item in items:
        item.safety = safety
        if identical:
            item.drop = "identical"
        elif (fmt != "text" and _is_empty(item.prompt)) or any(_is_empty(c) for c in item.comps):
            item.drop = "empty"
    return items


# ----------------------------------------------------------------------------------------------
# Rendering and tokenisation


class _TokenQueue:
    """Collects texts, tokenises them in batched calls, and hands back ids by reference."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.texts: dict[bool, list[str]] = {True: [], False: []}
        self.seen: dict[tuple[bool, str], tuple[bool, int]] = {}
        self.ids: dict[bool, list[list[int]]] = {}

    def add(self, text: str, special: bool) -> tuple[bool, int]:
        key = (special, text)
        ref = self.seen.get(key)
        if ref is None:
            ref = (special, len(self.texts[special]))
            self.texts[special].append(text)
            self.seen[key] = ref
        return ref

    def run(self) -> None:
        for special, texts in self.texts.items():
            out: list[list[int]] = []
            for start in range(0, len(texts), _TOKENIZE_CHUNK):
                enc = self.tokenizer(
                    texts[start : start + _TOKENIZE_CHUNK], add_special_tokens=special, verbose=False
                )
                out.extend(list(ids) for ids in enc["input_ids"])
            self.ids[special] = out

    def get(self, ref: tuple[bool, int]) -> list[int]:
        return list(self.ids[ref[0]][ref[1]])


def _render_chat(tokenizer: Any, messages: list, generation_prompt: bool, i: int, where: str) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # noqa: BLE001 - template errors (e.g. role order) are data errors
        raise DataError(f"{where} {i}: the tokenizer's chat template failed on this conversation ({_first_line(exc)})") from exc
    if not isinstance(text, str):
        raise DataError("the tokenizer's apply_chat_template(tokenize=False) did not return a string")
    return text


def _assistant_pieces(tokenizer: Any, prompt: list, rest: list, prompt_text: str, i: int, where: str) -> list[tuple[str, bool]]:
    """The rendered conversation after the prompt, cut into (text, is_assistant_turn) pieces.

    Each assistant turn is what rendering it adds after the history plus the generation prompt;
    the text in between (user turns, the generation prompt) carries no loss. Turns after the last
    assistant turn are left out: there is nothing to learn from them.
    """
    pieces: list[tuple[str, bool]] = []
    done, history = prompt_text, list(prompt)
    for message in rest:
        if message.get("role") == "assistant":
            before = _render_chat(tokenizer, history, True, i, where)
            after = _render_chat(tokenizer, history + [message], False, i, where)
            if not (before.startswith(done) and after.startswith(before)):
                raise DataError(
                    f"the tokenizer's chat template is not prefix-consistent ({where} {i}): a conversation rendered "
                    "turn by turn does not extend its earlier rendering, so assistant turns cannot be masked"
                )
            pieces += [(before[len(done) :], False), (after[len(before) :], True)]
            done = after
        history.append(message)
    return [(text, is_assistant) for text, is_assistant in pieces if text]


def _render(items: list[_Item], tokenizer: Any, queue: _TokenQueue, where: str) -> None:
    checked_template = False
    for item in items:
        if item.drop:
            continue
        if isinstance(item.prompt, list):
            if not checked_template:
                if not getattr(tokenizer, "chat_template", None):
                    raise DataError(
                        "the dataset is conversational (lists of {role, content} messages) but the tokenizer "
                        "has no chat template; use a chat model's tokenizer, set tokenizer.chat_template, "
                        "or give plain-text prompt/completion columns"
                    )
                checked_template = True
            prompt_text = _render_chat(tokenizer, item.prompt, True, item.src, where)
            comp_texts = []
            for comp in item.comps:
                full = _render_chat(tokenizer, item.prompt + comp, False, item.src, where)
                if not full.startswith(prompt_text):
                    raise DataError(
                        f"the tokenizer's chat template is not prefix-consistent ({where} {item.src}): the prompt "
                        "rendered with add_generation_prompt=True is not a prefix of the rendered prompt + "
                        "completion, so the completion cannot be cut out; use a template whose generation "
                        "prompt starts the assistant turn exactly as it is rendered"
                    )
                comp_texts.append(full[len(prompt_text) :])
            prompt_ref = queue.add(prompt_text, False)
            if item.multi_turn:
                pieces = _assistant_pieces(tokenizer, item.prompt, item.comps[0], prompt_text, item.src, where)
                item.segments = [(queue.add(text, False), is_assistant) for text, is_assistant in pieces]
                comp_texts = ["".join(text for text, _ in pieces)]
        else:
            prompt_text, comp_texts = item.prompt, list(item.comps)
            prompt_ref = queue.add(prompt_text, True)
        item.texts = (prompt_text, comp_texts)
        item.refs = (prompt_ref, [queue.add(t, False) for t in comp_texts])


@dataclass
class _Options:
    kind: str
    max_length: int
    max_prompt_length: int | None
    overlong: str
    eos_id: int | None
    bos_id: int | None
    strip_prompt_eos: bool  # the tokenizer appends EOS to single sequences: take it off prompts


def _keep_end(ids: list[int], n: int, bos_id: int | None) -> list[int]:
    """The last n tokens; a leading BOS is kept in front of them."""
    if bos_id is not None and ids and ids[0] == bos_id and n >= 2:
        return [bos_id] + ids[len(ids) - (n - 1) :]
    return ids[len(ids) - n :]


def _build(item: _Item, queue: _TokenQueue, opts: _Options, stats: dict[str, int]) -> dict | None:
    prompt_text, comp_texts = item.texts
    prompt_ref, comp_refs = item.refs
    conversational = isinstance(item.prompt, list)
    prompt_ids = queue.get(prompt_ref)
    if opts.strip_prompt_eos and not conversational and prompt_ids and prompt_ids[-1] == opts.eos_id:
        prompt_ids.pop()
    comps = []
    for ref in comp_refs:
        ids = queue.get(ref)
        if not ids or ids[-1] != opts.eos_id:
            ids.append(opts.eos_id)
        comps.append(ids)
    loss_mask = None
    if item.segments:  # multi-turn SFT: the pieces, tokenised separately, replace the whole completion
        ids, loss_mask = [], []
        for ref, is_assistant in item.segments:
            piece = queue.get(ref)
            ids += piece
            loss_mask += [int(is_assistant)] * len(piece)
        if not ids or ids[-1] != opts.eos_id:
            ids.append(opts.eos_id)
            loss_mask.append(1)
        comps = [ids]

    truncated = False
    prompt_cap = opts.max_prompt_length
    if opts.kind == "prompt" and prompt_cap is None:
        prompt_cap = opts.max_length
    if prompt_cap is not None and len(prompt_ids) > prompt_cap:
        if opts.overlong == "drop":
            stats["dropped_overlong"] += 1
            return None
        prompt_ids = _keep_end(prompt_ids, prompt_cap, opts.bos_id)
        truncated = True
    if opts.kind != "prompt":
        room = opts.max_length - len(prompt_ids)
        if room <= 0:
            stats["dropped_overlong"] += 1
            return None
        if any(len(c) > room for c in comps):
            if opts.overlong == "drop":
                stats["dropped_overlong"] += 1
                return None
            comps = [c[:room] for c in comps]
            loss_mask = loss_mask[:room] if loss_mask is not None else None
            truncated = True
    stats["truncated"] += truncated

    ex: dict[str, Any] = {"index": -1, "prompt_ids": prompt_ids, "prompt": prompt_text}
    if opts.kind == "preference":
        ex.update(chosen_ids=comps[0], rejected_ids=comps[1], chosen=comp_texts[0], rejected=comp_texts[1], margin=item.margin)
    elif opts.kind == "unpaired":
        ex.update(completion_ids=comps[0], completion=comp_texts[0], label=item.label)
    elif opts.kind == "sft":
        ex.update(completion_ids=comps[0], completion=comp_texts[0])
        if loss_mask is not None:
            ex["loss_mask"] = loss_mask  # 1 on assistant tokens of a multi-turn completion
    else:
        ex["answer"] = item.answer
    ex["messages"] = item.prompt if conversational else None
    if item.safety is not None:  # only data that carries the tag has the field
        ex["safety"] = item.safety
    return ex


def _process(
    rows: list[dict], fmt: str, tokenizer: Any, opts: _Options, where: str
) -> tuple[list[tuple[int, dict]], dict[str, int]]:
    """(source row number, example) pairs and the counts, for all rows of one source."""
    stats = dict.fromkeys(STAT_KEYS, 0)
    items: list[_Item] = []
    for i, row in enumerate(rows):
        items.extend(_normalise(row, i, fmt, opts.kind, where))
    stats["rows"] = len(items)
    queue = _TokenQueue(tokenizer)
    _render(items, tokenizer, queue, where)
    queue.run()
    out = []
    for item in items:
        if item.drop:
            stats[f"dropped_{item.drop}"] += 1
            continue
        ex = _build(item, queue, opts, stats)
        if ex is not None:
            out.append((item.src, ex))
    stats["kept"] = len(out)
    return out, stats


# ----------------------------------------------------------------------------------------------
# Public entry point


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
    return [_plain(row) for row in rows]


def _check_kind(fmt: str, kind: str, columns: list[str], what: str) -> None:
    if fmt in _ACCEPTS[kind]:
        return
    found = KIND_OF_FORMAT[fmt]
    presets = ", ".join(PRESETS_FOR_KIND[found])
    raise DataError(
        f"the {what} is {found} data (format '{fmt}': {FORMATS[fmt]}), but this algorithm trains on {kind} "
        f"data, which needs {_KIND_NEEDS[kind]}{_hint_text(columns) or '.'} "
        f"Presets that train on {found} data: {presets}"
    )


def _check_args(kind: str, max_length: Any, max_prompt_length: Any, eval_split: Any, overlong: Any, max_rows: Any) -> None:
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


def _nothing_left(stats: dict[str, int], what: str, opts: _Options) -> DataError:
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
    """
    _check_args(kind, max_length, max_prompt_length, eval_split, overlong, max_rows)
    rows = _rows_of(source, source_split, max_rows, "dataset")
    fmt, conversational = detect_format(rows)
    _check_kind(fmt, kind, list(rows[0]), "dataset")
    eval_rows = None
    if eval_source is not None:
        eval_rows = _rows_of(eval_source, eval_source_split, None, "eval dataset")
        eval_fmt, _ = detect_format(eval_rows)
        _check_kind(eval_fmt, kind, list(eval_rows[0]), "eval dataset")

    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None and kind != "prompt":
        raise ModelError("the tokenizer has no eos_token; set tokenizer.eos_token so completions can end with it")
    probe = list(tokenizer("", add_special_tokens=True)["input_ids"])
    bos_id = getattr(tokenizer, "bos_token_id", None)
    strip_prompt_eos = bool(probe) and eos_id is not None and probe[-1] == eos_id and (len(probe) > 1 or bos_id != eos_id)
    opts = _Options(kind, max_length, max_prompt_length, overlong, eos_id, bos_id, strip_prompt_eos)

    built, stats = _process(rows, fmt, tokenizer, opts, "row")
    if eval_rows is None:
        n_eval = _eval_count(len(rows), float(eval_split))
        eval_src = set(random.Random(seed).sample(range(len(rows)), n_eval))
        train = [ex for src, ex in built if src not in eval_src]
        evals = [ex for src, ex in built if src in eval_src]
    else:
        eval_built, eval_stats = _process(eval_rows, eval_fmt, tokenizer, opts, "eval row")
        if not eval_built:
            raise _nothing_left(eval_stats, "eval", opts)
        for key in STAT_KEYS:
            stats[key] += eval_stats[key]
        train = [ex for _, ex in built]
        evals = [ex for _, ex in eval_built]
    if not train:
        raise _nothing_left(stats, "training", opts)
    for part in (train, evals):
        for index, ex in enumerate(part):
            ex["index"] = index
    stats["train"], stats["eval"] = len(train), len(evals)
    return PreparedData(format=fmt, conversational=conversational, train=train, eval=evals, stats=stats, kind=kind)


__all__ = [
    "DATA_FILE_SUFFIXES",
    "FORMATS",
    "FORMAT_COLUMNS",
    "KIND_OF_FORMAT",
    "PRESETS_FOR_KIND",
    "PreparedData",
    "detect_format",
    "load_rows",
    "prepare",
]
