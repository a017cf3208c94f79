"""The same prompts' rollouts at two steps of one run, or in two runs: each shared prompt's completions best
first, A beside B, what differs highlighted in each side's colour as on the compare screen."""

from __future__ import annotations

from rich.console import Group as RichGroup
from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static

from tuiapp.data import move_step
from tuiapp.labels import Candidate
from tuiapp.rollouts import Group, RolloutReader, StepRollouts, sorted_samples
from tuiapp.widgets.chart import run_colour
from tuiapp.widgets.samples import diff_texts, fmt_reward, one_line, plain_prompt


def shared_prompts(a: StepRollouts, b: StepRollouts) -> list[tuple[Group, Group]]:
    """The groups of A and B with the same prompt text, in A's order (the first group of a prompt)."""
    by_prompt: dict[str, Group] = {}
    for group in b.groups:
        by_prompt.setdefault(group.prompt, group)
    return [(group, by_prompt[group.prompt]) for group in a.groups if group.prompt in by_prompt]


def ranked_table(a: Group, b: Group, colour_a: str, colour_b: str) -> Table:
    """Rank | A's completion (reward) | B's completion (reward), each side best first."""
    table = Table(expand=True, box=None, show_edge=False, pad_edge=False, header_style="bold", padding=(0, 1))
    table.add_column("#", no_wrap=True, width=2)
    table.add_column(Text("A", style=f"bold {colour_a}"), ratio=1, overflow="fold")
    table.add_column(Text("B", style=f"bold {colour_b}"), ratio=1, overflow="fold")
    ranked_a, ranked_b = sorted_samples(a.samples, "reward"), sorted_samples(b.samples, "reward")
    for rank in range(max(len(ranked_a), len(ranked_b))):
        sa = ranked_a[rank] if rank < len(ranked_a) else {}
        sb = ranked_b[rank] if rank < len(ranked_b) else {}
        text_a, text_b = diff_texts(
            str(sa.get("completion") or ""), str(sb.get("completion") or ""),
            f"bold black on {colour_a}", f"bold black on {colour_b}",
        )  # fmt: skip
        if sa:
            text_a.append(f"  {fmt_reward(sa.get('reward'))}", style="dim")
        if sb:
            text_b.append(f"  {fmt_reward(sb.get('reward'))}", style="dim")
        table.add_row(Text(str(rank + 1), style="dim"), text_a, text_b)
    return table


class RolloutCompareScreen(Screen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "back"),
        Binding("left_square_bracket", "step(0, -1)", "A older", key_display="["),
        Binding("right_square_bracket", "step(0, 1)", "A newer", key_display="]"),
        Binding("left_curly_bracket", "step(1, -1)", "B older", key_display="{"),
        Binding("right_curly_bracket", "step(1, 1)", "B newer", key_display="}"),
        Binding("L", "label", "label best vs best"),
    ]

    def __init__(self, sides: list[tuple[str, int | None]]) -> None:
        """`sides`: (run id, step or None for its newest) of A and B: one run twice, or two runs."""
        super().__init__()
        self.sides = list(sides)
        self.pages: list[StepRollouts | None] = [None, None]
        self._reader: RolloutReader | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="rc-title")
        with VerticalScroll(id="rc-scroll"):
            yield Static(id="rc-body")
        yield Footer()

    def on_mount(self) -> None:
        self._reader = RolloutReader(self.app.home)
        self._draw()
        self._read(list(self.sides))

    @work(thread=True, exclusive=True, group="rollout-compare")
    def _read(self, sides: list[tuple[str, int | None]]) -> None:
        pages = [self._reader.read(run_id, step) for run_id, step in sides]
        self.app.call_from_thread(self._got, sides, pages)

    def _got(self, sides: list[tuple[str, int | None]], pages: list[StepRollouts]) -> None:
        if sides == self.sides:
            self.pages = list(pages)
            self._draw()

    def action_step(self, side: int, delta: int) -> None:
        page = self.pages[side]
        if page is None or not page.steps:
            return
        run_id, _ = self.sides[side]
        self.sides[side] = (run_id, move_step(page.steps, page.step, delta))
        self.pages[side] = None
        self._draw()
        self._read(list(self.sides))

    def action_label(self) -> None:
        a, b = self.pages
        if a is None or b is None:
            return
        candidates = []
        for group_a, group_b in shared_prompts(a, b):
            best_a, best_b = sorted_samples(group_a.samples, "reward")[0], sorted_samples(group_b.samples, "reward")[0]
            text_a, text_b = str(best_a.get("completion") or ""), str(best_b.get("completion") or "")
            if text_a != text_b:
                candidates.append(
                    Candidate(
                        group_a.prompt,
                        text_a,
                        text_b,
                        "rollouts",
                        a.run_id,
                        a.step,
                        f"g{group_a.index}s{best_a.get('sample')}",
                        b.run_id,
                        b.step,
                        f"g{group_b.index}s{best_b.get('sample')}",
                    )  # fmt: skip
                )
        run = self._run(a.run_id)
        if run is None:
            return
        from tuiapp.screens.label import LabelScreen

        self.app.push_screen(LabelScreen(candidates, run, f"best rollouts, steps {a.step} vs {b.step}"))

    def _run(self, run_id: str):
        snap = self.app.snapshot
        return next((r for r in snap.runs if r.id == run_id), None) if snap else None

    def _heading(self, side: int) -> Text:
        letter, keys = ("A", "[ ]") if side == 0 else ("B", "{ }")
        run_id, _ = self.sides[side]
        run = self._run(run_id)
        text = Text(f"{letter} ", style=f"bold {run_colour(side)}")
        text.append(run.name if run else run_id, style="bold")
        page = self.pages[side]
        if page is None:
            text.append("  reading…", style="dim")
        elif page.step is None:
            text.append("  no rollouts stored", style="dim")
        else:
            text.append(f"  step {page.step}")
            text.append(f" ({page.steps.index(page.step) + 1}/{len(page.steps)}, {keys})", style="dim")
        return text

    def _draw(self) -> None:
        title = Text("Rollouts side by side", style="bold")
        title.append("   the same prompts, completions best first; L labels A's best against B's", style="dim")
        heading = self._heading(0)
        heading.append("   ")
        heading.append_text(self._heading(1))
        self.query_one("#rc-title", Static).update(RichGroup(title, heading))
        body = self.query_one("#rc-body", Static)
        a, b = self.pages
        if a is None or b is None:
            body.update("")
            return
        if a.step is None or b.step is None:
            body.update(
                Text("both sides need stored rollouts (the Rollouts tab, 5, says why a run has none)", style="dim")
            )
            return
        shared = shared_prompts(a, b)
        if not shared:
            body.update(Text("no prompt appears at both steps (prompts are matched by their text)", style="dim"))
            return
        parts: list = [Text(f"{len(shared)} shared prompts", style="bold")]
        for group_a, group_b in shared:
            heading = Text("\nprompt ", style="bold")
            heading.append(one_line(plain_prompt(group_a.prompt), 200), style="italic")
            for letter, group in (("A", group_a), ("B", group_b)):
                if group.mean is not None:
                    heading.append(f"   {letter} mean {fmt_reward(group.mean)}", style="dim")
            parts.append(heading)
            parts.append(ranked_table(group_a, group_b, run_colour(0), run_colour(1)))
        body.update(RichGroup(*parts))
