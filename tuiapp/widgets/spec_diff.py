"""Which settings differ between compared runs: one line per setting, each run's value in its colour."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from tuiapp.text import setting_text, spec_diff


def diff_text(runs: list[tuple[str, str, dict[str, Any]]], max_lines: int = 4) -> Text:
    """`runs` as (name, colour, spec): the differing settings, the first `max_lines` of them."""
    if len(runs) < 2:
        return Text("")
    diff = spec_diff([spec for _, _, spec in runs])
    if not diff:
        return Text(f"same settings in all {len(runs)} runs (only their names differ)", style="dim")
    text = Text()
    text.append("differ ", style="bold")
    width = max(len(key) for key, _ in diff[:max_lines])
    for i, (key, values) in enumerate(diff[:max_lines]):
        if i:
            text.append("\n       ")
        text.append(f"{key:<{width}} ", style="dim")
        for j, ((_, colour, _), value) in enumerate(zip(runs, values)):
            text.append(("" if j == 0 else " ") + setting_text(value), style=colour)
    if len(diff) > max_lines:
        rest = ", ".join(key for key, _ in diff[max_lines:])
        text.append(f"\n       +{len(diff) - max_lines} more: {rest}", style="dim")
    return text


class SpecDiff(Static):
    """The spec diff of the runs it is given (`runs`: (name, colour, spec) in display order)."""

    runs: reactive[list[tuple[str, str, dict[str, Any]]]] = reactive(list, always_update=True)
    max_lines: reactive[int] = reactive(4)

    def watch_runs(self) -> None:
        self.update(diff_text(self.runs, self.max_lines))

    def watch_max_lines(self) -> None:
        self.update(diff_text(self.runs, self.max_lines))
