"""The dataset formats, the data kind each one is, and detecting a dataset's format from its
columns; the column-name hints of the errors."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from engine.data.normalise import check_text_value, split_implicit, split_last_assistant
from engine.errors import DataError
from engine.registry import DATA_KINDS, algorithms_for

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
    "question": "prompt",
    "instruction": "prompt",
    "query": "prompt",
    "input": "prompt",
    "response": "completion",
    "output": "completion",
    "conversations": "messages",
    "conversation": "messages",
    "chat": "messages",
    "dialog": "messages",
    "dialogue": "messages",
    "preferred": "chosen",
    "accepted": "chosen",
    "winner": "chosen",
    "dispreferred": "rejected",
    "loser": "rejected",
    "content": "text",
}


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
        check_text_value(first.get(col), col, 0, "row", messages_only=fmt == "messages", text_only=fmt == "text")
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
        return bool(split_implicit(chosen, rejected)[0].strip())
    if isinstance(chosen, list) and isinstance(rejected, list):
        return bool(split_last_assistant(chosen)[0])
    return False


def check_kind(fmt: str, kind: str, columns: list[str], what: str) -> None:
    if fmt in _ACCEPTS[kind]:
        return
    found = KIND_OF_FORMAT[fmt]
    presets = ", ".join(PRESETS_FOR_KIND[found])
    raise DataError(
        f"the {what} is {found} data (format '{fmt}': {FORMATS[fmt]}), but this algorithm trains on {kind} "
        f"data, which needs {_KIND_NEEDS[kind]}{_hint_text(columns) or '.'} "
        f"Presets that train on {found} data: {presets}"
    )
