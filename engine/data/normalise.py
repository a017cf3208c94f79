"""Turn rows of each format into items: a prompt with its completion(s), label, answer, margin and
safety tag, as text or as message lists. Row numbers in errors count from 0, like `dataset[i]`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.errors import DataError

_HH_ASSISTANT = re.compile(r"(?:^|\n)Assistant:")


def is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def check_text_value(
    value: Any, col: str, i: int, where: str, *, messages_only: bool = False, text_only: bool = False
) -> str | list:
    if value is None:
        return [] if messages_only else ""
    if isinstance(value, str) and not messages_only:
        return value
    if not text_only and is_messages(value):
        return value
    expected = (
        "a list of {role, content} messages"
        if messages_only
        else "a string"
        if text_only
        else "a string or a list of {role, content} messages"
    )
    raise DataError(f"{where} {i}: column '{col}' holds {describe(value)}; expected {expected}")


def split_last_assistant(messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """(messages before the last assistant turn, [that turn]); ([...all], []) if there is none."""
    for j in range(len(messages) - 1, -1, -1):
        if messages[j].get("role") == "assistant":
            return messages[:j], [messages[j]]
    return messages, []


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def split_implicit(chosen: str, rejected: str) -> tuple[str, str, str]:
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
        splits_word = (
            cut > 0 and _is_word(chosen[cut - 1]) and any(cut < len(s) and _is_word(s[cut]) for s in (chosen, rejected))
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
    raise DataError(f"{where} {i}: '{column}' must be a boolean (true/false, or 0/1), got {describe(value)}")


@dataclass
class Item:
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
    columns: dict | None = None  # prompt data: the row's other columns, as they are (reward functions read them)


def _with_prompt(prompt: str | list, comps: list, i: int, where: str) -> tuple[str | list, list]:
    """Pair a prompt with completions; if any is a message list, make them all message lists."""
    if not isinstance(prompt, list) and not any(isinstance(c, list) for c in comps):
        return prompt, comps
    if isinstance(prompt, str) and all(isinstance(c, list) for c in comps):
        splits = [split_last_assistant(c) for c in comps]
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
    comps = [c if isinstance(c, list) else ([{"role": "assistant", "content": c}] if c.strip() else []) for c in comps]
    return prompt, comps


def _implicit(chosen: str | list, rejected: str | list, i: int, where: str) -> tuple[str | list, list]:
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt, c, r = split_implicit(chosen, rejected)
        return prompt, [c, r]
    if isinstance(chosen, list) and isinstance(rejected, list):
        cp, cl = split_last_assistant(chosen)
        rp, rl = split_last_assistant(rejected)
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
        raise DataError(f"{where} {i}: 'margin' must be a number (a reward margin for the pair), got {describe(value)}")
    return float(value)


def normalise(row: Mapping, i: int, fmt: str, kind: str, where: str) -> list[Item]:
    def get(col: str) -> str | list:
        return check_text_value(row.get(col), col, i, where)

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
        messages = check_text_value(row.get("messages"), "messages", i, where, messages_only=True)
        first = next((j for j, m in enumerate(messages) if m.get("role") == "assistant"), len(messages))
        prompt, comps = messages[:first], [messages[first:]]
    elif fmt == "messages":
        messages = check_text_value(row.get("messages"), "messages", i, where, messages_only=True)
        prompt, last = split_last_assistant(messages)
        comps = [last]
    elif fmt == "text":
        prompt, comps = "", [check_text_value(row.get("text"), "text", i, where, text_only=True)]
    else:  # prompt_only
        prompt, comps = get("prompt"), []

    if kind == "prompt":
        answer = row.get("answer")
        columns = {str(k): v for k, v in row.items() if k != "prompt"}
        items = [Item(i, prompt, [], answer=None if answer is None else str(answer), columns=columns)]
    elif kind == "unpaired" and fmt != "unpaired":
        items = [Item(i, prompt, [comps[0]], label=True), Item(i, prompt, [comps[1]], label=False)]
    elif kind == "unpaired":
        items = [Item(i, prompt, comps, label=_label(row.get("label"), i, where))]
    elif kind == "sft":
        items = [Item(i, prompt, comps[:1], multi_turn=fmt == "messages")]
    else:
        items = [Item(i, prompt, comps, margin=_margin(row.get("margin"), i, where))]

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
