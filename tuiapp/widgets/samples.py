"""Reference vs policy completions side by side at one logged step, with verifier marks and a
character-level diff: what the policy says differently is highlighted on both sides."""

from __future__ import annotations

import difflib
import re
from typing import Any

from rich.table import Table
from rich.text import Text
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import Static


def mark(score: Any) -> Text:
    if score is None:
        return Text("")
    return Text(" ✓", style="green") if score >= 1 else Text(" ✗", style="red")


_SPECIAL = re.compile(r"<\|[A-Za-z_]+\|>")  # chat-template markers such as <|user|>, <|end|>


def plain_prompt(value: Any) -> str:
    """A prompt as a reader wants it: chat-template markers out (the completion follows them anyway)."""
    text = "" if value is None else str(value)
    stripped = _SPECIAL.sub(" ", text)
    return " ".join(stripped.split()) if stripped.strip() else text


def one_line(value: Any, limit: int = 400) -> str:
    text = "" if value is None else str(value)
    text = text.replace("\n", "⏎ ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


REMOVED = "bold red underline"  # in the reference: characters the policy dropped or replaced
ADDED = "bold black on yellow"  # in the policy: characters it added or replaced


def char_diff(reference: str, policy: str) -> tuple[Text, Text]:
    """Both texts with their differing characters styled (difflib's opcodes, no junk heuristic)."""
    ref, pol = Text(), Text()
    matcher = difflib.SequenceMatcher(None, reference, policy, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            ref.append(reference[i1:i2])
            pol.append(policy[j1:j2])
        else:
            ref.append(reference[i1:i2], style=REMOVED)
            pol.append(policy[j1:j2], style=ADDED)
    return ref, pol


def samples_table(samples: list[dict[str, Any]]) -> Table:
    """Prompt | reference | policy; where the policy differs from the reference, the changed
    characters are highlighted (added: yellow background; replaced in the reference: red)."""
    table = Table(expand=True, box=None, show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("prompt", ratio=2, overflow="fold")
    table.add_column("reference", ratio=3, overflow="fold")
    table.add_column("policy", ratio=3, overflow="fold")
    # What the training changed comes first (it is what one looks for), otherwise in logged order.
    for row in sorted(samples, key=lambda r: r.get("reference") == r.get("policy")):
        ref, pol = one_line(row.get("reference")), one_line(row.get("policy"))
        if ref != pol:
            ref_text, pol_text = char_diff(ref, pol)
        else:
            ref_text, pol_text = Text(ref), Text(pol)
        ref_text += mark(row.get("reference_score"))
        pol_text += mark(row.get("policy_score"))
        prompt = Text(one_line(plain_prompt(row.get("prompt"))), style="dim")
        if row.get("answer") is not None:
            prompt.append(f"  → {one_line(row['answer'], 60)}", style="dim italic")
        table.add_row(prompt, ref_text, pol_text)
    return table


def score_summary(samples: list[dict[str, Any]]) -> str:
    ref = [s["reference_score"] for s in samples if s.get("reference_score") is not None]
    pol = [s["policy_score"] for s in samples if s.get("policy_score") is not None]
    if not ref and not pol:
        return ""
    parts = []
    if ref:
        parts.append(f"reference {sum(1 for v in ref if v >= 1)}/{len(ref)} ✓")
    if pol:
        parts.append(f"policy {sum(1 for v in pol if v >= 1)}/{len(pol)} ✓")
    return "  ".join(parts)


def changed_count(samples: list[dict[str, Any]]) -> int:
    return sum(1 for s in samples if s.get("reference") != s.get("policy"))


class SamplesView(VerticalScroll, can_focus=True):
    """Step through the logged sample comparisons with ←/→ (or [ and ] from anywhere)."""

    BINDINGS = [
        Binding("left", "step(-1)", "older step", show=True),
        Binding("right", "step(1)", "newer step", show=True),
    ]

    class StepRequested(Message):
        def __init__(self, delta: int) -> None:
            self.delta = delta
            super().__init__()

    def compose(self):
        yield Static(id="samples-title")
        yield Static(id="samples-body")

    def action_step(self, delta: int) -> None:
        self.post_message(self.StepRequested(delta))

    def show(self, steps: list[int], step: int | None, samples: list[dict[str, Any]]) -> None:
        title = self.query_one("#samples-title", Static)
        body = self.query_one("#samples-body", Static)
        if step is None or not steps:
            title.update(Text("no sample comparisons logged yet (every sample_steps steps)", style="dim"))
            body.update("")
            return
        pos = steps.index(step) + 1 if step in steps else len(steps)
        header = Text(f"step {step}", style="bold")
        header.append(f"  ({pos} of {len(steps)} logged, ←/→ or [ ] to move)", style="dim")
        summary = score_summary(samples)
        if summary:
            header.append(f"   {summary}")
        if samples:
            header.append(f"   {changed_count(samples)} of {len(samples)} changed (first)", style="yellow")
        title.update(header)
        body.update(samples_table(samples))
