"""Sample rows side by side at one logged step: reference vs policy completions with verifier marks
and a character-level diff (what the policy says differently is highlighted on both sides); for
preference methods, chosen vs rejected on held-out pairs with the method's reward of each and the
margin; and two runs' policies on the same prompts (the compare screen)."""

from __future__ import annotations

import difflib
import re
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Static

from jobs.store import sample_kind
from tuiapp.text import margin_stats


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


def char_diff(reference: str, policy: str, removed: str = REMOVED, added: str = ADDED) -> tuple[Text, Text]:
    """Both texts with their differing characters styled (difflib's opcodes, no junk heuristic)."""
    ref, pol = Text(), Text()
    matcher = difflib.SequenceMatcher(None, reference, policy, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            ref.append(reference[i1:i2])
            pol.append(policy[j1:j2])
        else:
            ref.append(reference[i1:i2], style=removed)
            pol.append(policy[j1:j2], style=added)
    return ref, pol


def diff_texts(a: str, b: str, style_a: str, style_b: str) -> tuple[Text, Text]:
    """Two one-line texts, their differing characters styled when they differ."""
    a, b = one_line(a), one_line(b)
    return char_diff(a, b, style_a, style_b) if a != b else (Text(a), Text(b))


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


CHOSEN_DIFF = "bold underline"  # where chosen and rejected differ, on both sides


def fmt_reward(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:+.3g}"


def margin_text(margin: Any) -> Text:
    if margin is None:
        return Text("-", style="dim")
    ok = margin > 0
    return Text(f"{fmt_reward(margin)} {'✓' if ok else '✗'}", style="green" if ok else "red")


def preference_summary(rows: list[dict[str, Any]]) -> Text:
    """How often the chosen side is ahead on the method's own reward, and the mean margin."""
    text = Text(f"chosen vs rejected on {len(rows)} held-out pairs", style="bold")
    stats = margin_stats(rows)
    if stats is not None:
        n, ahead, mean = stats
        text.append(f"   chosen ahead {ahead}/{n}", style="green" if ahead * 2 > n else "yellow")
        text.append(f"   mean margin {fmt_reward(mean)}")
    return text


def preference_table(rows: list[dict[str, Any]]) -> Table:
    """Prompt | chosen (its reward) | rejected (its reward) | margin, in logged order so a pair keeps
    its place from step to step; where chosen and rejected differ is underlined on both."""
    table = Table(expand=True, box=None, show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("prompt", ratio=2, overflow="fold")
    table.add_column("chosen (reward)", ratio=3, overflow="fold")
    table.add_column("rejected (reward)", ratio=3, overflow="fold")
    table.add_column("margin", no_wrap=True, justify="right")
    for row in rows:
        chosen, rejected = diff_texts(row.get("chosen"), row.get("rejected"), CHOSEN_DIFF, CHOSEN_DIFF)
        margin = row.get("margin")
        chosen.append(
            f" {fmt_reward(row.get('chosen_reward'))}", style="green" if margin is not None and margin > 0 else "dim"
        )
        rejected.append(
            f" {fmt_reward(row.get('rejected_reward'))}", style="red" if margin is not None and margin <= 0 else "dim"
        )
        table.add_row(
            Text(one_line(plain_prompt(row.get("prompt"))), style="dim"), chosen, rejected, margin_text(margin)
        )
    return table


def unpaired_table(rows: list[dict[str, Any]]) -> Table:
    """Prompt | completion with its label (✓ desirable, ✗ undesirable) | the method's reward of it."""
    table = Table(expand=True, box=None, show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("prompt", ratio=2, overflow="fold")
    table.add_column("completion", ratio=4, overflow="fold")
    table.add_column("reward", no_wrap=True, justify="right")
    for row in rows:
        completion = Text(one_line(row.get("completion")))
        completion += Text(" ✓", style="green") if row.get("label") else Text(" ✗", style="red")
        table.add_row(
            Text(one_line(plain_prompt(row.get("prompt"))), style="dim"),
            completion,
            Text(fmt_reward(row.get("reward"))),
        )
    return table


def samples_body(samples: list[dict[str, Any]], pairs_first: bool = False) -> Group:
    """Every kind of row logged at a step, one section each (reference vs policy; chosen vs rejected;
    unpaired completions); `pairs_first` puts the preference pairs on top."""
    comparisons = [r for r in samples if sample_kind(r) == "comparison"]
    pairs = [r for r in samples if sample_kind(r) == "preference"]
    unpaired = [r for r in samples if sample_kind(r) == "unpaired"]
    sections: list[list[Any]] = []
    if comparisons:
        sections.append([samples_table(comparisons)])
    if pairs:
        section = [preference_summary(pairs), preference_table(pairs)]
        sections.insert(0 if pairs_first else len(sections), section)
    if unpaired:
        desirable = sum(1 for r in unpaired if r.get("label"))
        sections.append(
            [
                Text(
                    f"completions with their label on {len(unpaired)} held-out rows "
                    f"({desirable} desirable ✓)   reward = beta (log pi - log ref)",
                    style="bold",
                ),
                unpaired_table(unpaired),
            ]
        )
    parts: list[Any] = []
    for i, section in enumerate(sections):
        if i:
            parts.append(Text(""))
        parts.extend(section)
    return Group(*parts)


def compare_table(shared: list[tuple[str, dict[str, Any], dict[str, Any]]], colour_a: str, colour_b: str) -> Table:
    """Prompt | A's policy | B's policy on the same prompts: differing ones first, the characters
    where they differ on each run's own colour; verifier marks where the prompts have answers."""
    table = Table(expand=True, box=None, show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("prompt", ratio=2, overflow="fold")
    table.add_column(Text("A", style=f"bold {colour_a}"), ratio=3, overflow="fold")
    table.add_column(Text("B", style=f"bold {colour_b}"), ratio=3, overflow="fold")
    for prompt, a, b in sorted(shared, key=lambda t: (t[1].get("policy") or "") == (t[2].get("policy") or "")):
        a_text, b_text = diff_texts(
            a.get("policy") or "", b.get("policy") or "", f"bold black on {colour_a}", f"bold black on {colour_b}"
        )
        a_text += mark(a.get("policy_score"))
        b_text += mark(b.get("policy_score"))
        cell = Text(one_line(plain_prompt(prompt)), style="dim")
        answer = a.get("answer") if a.get("answer") is not None else b.get("answer")
        if answer is not None:
            cell.append(f"  → {one_line(answer, 60)}", style="dim italic")
        table.add_row(cell, a_text, b_text)
    return table


def compare_pairs_table(pairs: list[tuple[str, dict[str, Any], dict[str, Any]]], colour_a: str, colour_b: str) -> Table:
    """The same held-out pairs in both runs: chosen | rejected | A's margin | B's margin."""
    table = Table(expand=True, box=None, show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("prompt", ratio=2, overflow="fold")
    table.add_column("chosen", ratio=2, overflow="fold")
    table.add_column("rejected", ratio=2, overflow="fold")
    table.add_column(Text("A margin", style=f"bold {colour_a}"), no_wrap=True, justify="right")
    table.add_column(Text("B margin", style=f"bold {colour_b}"), no_wrap=True, justify="right")
    for prompt, a, b in pairs:
        chosen, rejected = diff_texts(a.get("chosen"), a.get("rejected"), CHOSEN_DIFF, CHOSEN_DIFF)
        table.add_row(
            Text(one_line(plain_prompt(prompt)), style="dim"),
            chosen,
            rejected,
            margin_text(a.get("margin")),
            margin_text(b.get("margin")),
        )
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
    return sum(1 for s in samples if sample_kind(s) == "comparison" and s.get("reference") != s.get("policy"))


class SamplesView(VerticalScroll, can_focus=True):
    """Step through the logged sample comparisons with ←/→ (or [ and ] from anywhere); p puts the
    preference pairs (chosen vs rejected) first or last."""

    BINDINGS = [
        Binding("left", "step(-1)", "older step", show=True),
        Binding("right", "step(1)", "newer step", show=True),
        Binding("p", "pairs_first", "pairs first/last", show=False),
    ]

    pairs_first: reactive[bool] = reactive(False)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._shown: tuple[list[int], int | None, list[dict[str, Any]]] = ([], None, [])

    class StepRequested(Message):
        def __init__(self, delta: int) -> None:
            self.delta = delta
            super().__init__()

    def compose(self):
        yield Static(id="samples-title")
        yield Static(id="samples-body")

    def action_step(self, delta: int) -> None:
        self.post_message(self.StepRequested(delta))

    def action_pairs_first(self) -> None:
        self.pairs_first = not self.pairs_first

    def watch_pairs_first(self) -> None:
        if self.is_mounted:
            self.show(*self._shown)

    def show(self, steps: list[int], step: int | None, samples: list[dict[str, Any]]) -> None:
        self._shown = (steps, step, samples)
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
        comparisons = sum(1 for s in samples if sample_kind(s) == "comparison")
        if comparisons:
            header.append(f"   {changed_count(samples)} of {comparisons} changed (first)", style="yellow")
        pairs = sum(1 for s in samples if sample_kind(s) == "preference")
        if pairs and comparisons:
            header.append(f"   {pairs} pairs {'above' if self.pairs_first else 'below'} (p)", style="dim")
        title.update(header)
        body.update(samples_body(samples, self.pairs_first))


def pair_table(a: str, b: str, colour_a: str, colour_b: str, head_a: Text, head_b: Text) -> Table:
    """Two completions in two columns, the characters where they differ on each side's own colour (as the
    compare screen marks two runs' answers); the full texts, line breaks kept."""
    table = Table(expand=True, box=None, show_edge=False, pad_edge=False, header_style="bold", padding=(0, 1))
    table.add_column(head_a, ratio=1, overflow="fold")
    table.add_column(head_b, ratio=1, overflow="fold")
    if a == b:
        table.add_row(Text(a), Text(b))
    else:
        table.add_row(*char_diff(a, b, f"bold black on {colour_a}", f"bold black on {colour_b}"))
    return table
