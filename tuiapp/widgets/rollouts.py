"""The Rollouts tab: an online run's training rollouts at one stored step, each prompt's group of
completions side by side (stacked where the pane is narrow) with reward components, total, advantage
and length; zero-variance groups flagged. Reads in a worker thread (tuiapp.rollouts.RolloutReader)."""

from __future__ import annotations

from typing import Any

from rich.console import Group as RichGroup
from rich.table import Table
from rich.text import Text
from textual import work
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.reactive import reactive
from textual.widgets import Static
from textual.worker import get_current_worker

from tuiapp.data import LIVE, RunInfo, move_step
from tuiapp.rollouts import (
    SORTS,
    Group,
    RolloutReader,
    StepRollouts,
    moved_most,
    no_rollouts_reason,
    sorted_groups,
    sorted_samples,
)
from tuiapp.widgets.samples import fmt_reward, one_line, plain_prompt

SIDE_BY_SIDE_MIN = 22  # columns a completion needs to be read beside its neighbours; narrower panes stack them


def reward_text(sample: dict[str, Any], best: float | None, worst: float | None) -> Text:
    """The total reward, green when the group's best and red when its worst (when they differ)."""
    reward = sample.get("reward")
    style = "bold"
    if reward is not None and best != worst:
        style = "green" if reward == best else "red" if reward == worst else style
    return Text(fmt_reward(reward), style=style)


def components_text(sample: dict[str, Any]) -> Text:
    """Each reward source's score, where there are several (one source alone is the total)."""
    components = sample.get("rewards") or {}
    if len(components) < 2 and sample.get("reward") is not None:
        return Text("")
    return Text("  ".join(f"{name} {fmt_reward(value)}" for name, value in components.items()), style="dim")


def length_text(sample: dict[str, Any]) -> Text:
    text = Text(f"{sample.get('length', '-')} tok", style="dim")
    if sample.get("truncated"):
        text.append(" ✂", style="yellow")  # hit max_new_tokens without EOS
    return text


def sample_stats(sample: dict[str, Any], best: float | None, worst: float | None) -> Text:
    """reward · advantage · length, then each reward component: under a completion shown side by side."""
    text = Text("r ", style="dim")
    text.append_text(reward_text(sample, best, worst))
    text.append("  adv ", style="dim")
    text.append(fmt_reward(sample.get("advantage")))
    text.append("  ")
    text.append_text(length_text(sample))
    components = components_text(sample)
    if components.plain:
        text.append("\n")
        text.append_text(components)
    return text


def completion_text(sample: dict[str, Any]) -> Text:
    """The completion, or a multi-turn episode turn by turn: each turn's role (tool calls and errors marked)."""
    turns = sample.get("turns")
    if not turns:
        return Text(one_line(sample.get("completion")))
    from engine.rollout_store import turn_label  # the app imports no engine module at start-up

    text = Text()
    for i, turn in enumerate(turns):
        label = turn_label(turn)
        text.append(("\n" if i else "") + label + ": ", style="red" if turn.get("error") else "dim")
        text.append(one_line(turn.get("content"), 200))
    if sample.get("error"):
        text.append(f"\nended on: {sample['error']}", style="red")
    return text


def group_heading(group: Group, of: int) -> Text:
    text = Text(f"prompt {group.index + 1}/{of} ", style="bold")
    text.append(one_line(plain_prompt(group.prompt), 200), style="italic")
    if group.mean is not None:
        text.append(f"   mean {fmt_reward(group.mean)} ± {group.std:.3g}", style="dim")
    if group.zero_variance:
        text.append("\n⚠ zero variance: every sample scored the same, the group teaches nothing", style="yellow")
    return text


def group_table(group: Group, sort: str, side_by_side: bool) -> Table:
    """The group's completions as columns (side by side) or as rows (stacked)."""
    samples = sorted_samples(group.samples, sort)
    rewards = group.rewards
    best, worst = (max(rewards), min(rewards)) if rewards else (None, None)
    table = Table(expand=True, box=None, show_edge=False, pad_edge=False, header_style="bold", padding=(0, 1))
    if side_by_side:
        for sample in samples:
            table.add_column(f"#{sample.get('sample', '?')}", ratio=1, overflow="fold")
        table.add_row(*(completion_text(s) for s in samples))
        table.add_row(*(sample_stats(s, best, worst) for s in samples))
        return table
    table.add_column("#", no_wrap=True)
    table.add_column("completion", ratio=1, overflow="fold")
    table.add_column("reward", no_wrap=True, justify="right")
    table.add_column("adv", no_wrap=True, justify="right")
    table.add_column("len", no_wrap=True, justify="right")
    table.add_column("components", ratio=1, overflow="fold")
    for sample in samples:
        table.add_row(
            Text(f"#{sample.get('sample', '?')}", style="dim"),
            completion_text(sample),
            reward_text(sample, best, worst),
            Text(fmt_reward(sample.get("advantage"))),
            length_text(sample),
            components_text(sample),
        )
    return table


class RolloutsView(VerticalScroll, can_focus=True):
    """←/→ (or [ ]) move between stored steps; o sorts the completions by reward or advantage; j jumps to
    the steps where the mean reward moved most; w compares a step's prompts with another step's; L labels
    the step's completions two at a time."""

    BINDINGS = [
        Binding("left", "step(-1)", "older step"),
        Binding("right", "step(1)", "newer step"),
        Binding("o", "sort", "sort"),
        Binding("j", "jump", "moved most"),
        Binding("w", "compare_steps", "vs step"),
        Binding("L", "label", "label"),
    ]

    sort: reactive[str] = reactive("sample")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.run_info: RunInfo | None = None
        self.page: StepRollouts | None = None  # the step shown (None: not read yet)
        self.wanted: int | None = None  # the step asked for (None: the newest)
        self.moves: list[tuple[int, float]] = []  # (step, change of the mean reward), once j was pressed
        self._jump = 0  # the next of `moves` j goes to
        self._reader: RolloutReader | None = None

    def compose(self):
        yield Static(id="rollouts-title")
        yield Static(id="rollouts-body")

    # ------------------------------------------------------------------ reading

    @property
    def reader(self) -> RolloutReader:
        if self._reader is None:
            self._reader = RolloutReader(self.app.home)
        return self._reader

    def show_run(self, run: RunInfo | None, shown: bool) -> None:
        """The focused run (each snapshot): while the tab is `shown`, read it when it changed, and again
        while it is live (a new step may have stored its shard)."""
        changed = run is None or self.run_info is None or run.id != self.run_info.id
        self.run_info = run
        if changed:
            self.page, self.wanted, self.moves, self._jump = None, None, [], 0
            self._draw()
        if run is not None and shown and (self.page is None or run.status in LIVE):
            self.read()

    def read(self) -> None:
        if self.run_info is not None:
            self._read(self.run_info.id, self.wanted)  # exclusive: a newer request cancels an older one

    @work(thread=True, exclusive=True, group="rollouts")
    def _read(self, run_id: str, wanted: int | None) -> None:
        try:
            page = self.reader.read(run_id, wanted)
        except (OSError, ValueError) as err:  # a shard a person edited by hand
            page = StepRollouts(run_id, [], None)
            self.app.call_from_thread(self.notify, f"reading the rollouts failed: {err}", severity="error")
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(self._got, page, wanted)

    def _got(self, page: StepRollouts, wanted: int | None) -> None:
        if self.run_info is None or page.run_id != self.run_info.id or wanted != self.wanted:
            return  # read for another run or step than the one now wanted
        if self.page is not None and len(page.steps) != len(self.page.steps):
            self.moves, self._jump = [], 0  # a live run stored another step: j ranks the moves again
        self.page = page
        self._draw()

    # ------------------------------------------------------------------ actions

    def action_step(self, delta: int) -> None:
        page = self.page
        if page is None or not page.steps:
            return
        step = move_step(page.steps, page.step, delta)
        self.wanted = None if step == page.steps[-1] else step
        self.read()

    def action_sort(self) -> None:
        self.sort = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]

    def watch_sort(self) -> None:
        if self.is_mounted:
            self._draw()

    def action_jump(self) -> None:
        """To the next of the steps where the mean reward moved most (the ranking is read once, off the UI)."""
        if self.run_info is None:
            return
        if self.moves:
            self._go_to_move()
        else:
            self._read_moves(self.run_info.id)

    @work(thread=True, exclusive=True, group="rollout-means")
    def _read_moves(self, run_id: str) -> None:
        moves = moved_most(self.reader.step_means(run_id))
        self.app.call_from_thread(self._got_moves, run_id, moves)

    def _got_moves(self, run_id: str, moves: list[tuple[int, float]]) -> None:
        if self.run_info is None or run_id != self.run_info.id:
            return
        if not moves:
            self.notify("fewer than two stored steps with rewards: nothing to rank", severity="warning")
            return
        self.moves, self._jump = moves, 0
        self._go_to_move()

    def _go_to_move(self) -> None:
        step, _ = self.moves[self._jump % len(self.moves)]
        self._jump += 1
        self.wanted = step
        self.read()

    def action_compare_steps(self) -> None:
        page = self.page
        if self.run_info is None or page is None or page.step is None:
            self.notify("no rollouts to compare", severity="warning")
            return
        from tuiapp.screens.rollout_compare import RolloutCompareScreen

        before = move_step(page.steps, page.step, -1)
        self.app.push_screen(RolloutCompareScreen([(self.run_info.id, before), (self.run_info.id, page.step)]))

    def action_label(self) -> None:
        page = self.page
        if self.run_info is None or page is None or not page.groups:
            self.notify("no rollouts at this step to label", severity="warning")
            return
        from tuiapp.labels import rollout_candidates
        from tuiapp.screens.label import LabelScreen

        candidates = rollout_candidates(self.run_info.id, page.groups)
        self.app.push_screen(LabelScreen(candidates, self.run_info, f"rollouts of step {page.step}"))

    # ------------------------------------------------------------------ drawing

    def _draw(self) -> None:
        title = self.query_one("#rollouts-title", Static)
        body = self.query_one("#rollouts-body", Static)
        run, page = self.run_info, self.page
        if run is None:
            title.update(Text("no run selected", style="dim"))
            body.update("")
            return
        if page is None:
            title.update(Text("reading the rollouts…", style="dim"))
            body.update("")
            return
        if page.step is None:
            title.update(Text(no_rollouts_reason(run.algorithm, run.spec, run.status, run.location), style="dim"))
            body.update("")
            return
        pos = page.steps.index(page.step) + 1
        header = Text(f"step {page.step}", style="bold")
        header.append(f" ({pos}/{len(page.steps)}, ←/→)", style="dim")
        header.append(f"   {len(page.groups)} prompts")
        if page.zero_variance:
            header.append(f"   {page.zero_variance} zero-variance", style="yellow")
        if page.mean_reward is not None:
            header.append(f"   mean reward {fmt_reward(page.mean_reward)}")
        header.append(f"\nsort: {self.sort} (o)   moved most (j)", style="dim")
        if self.moves:
            header.append(": " + ", ".join(f"{s} {fmt_reward(d)}" for s, d in self.moves), style="dim")
        header.append("   vs step (w)   label (L)", style="dim")
        title.update(header)
        shown = sorted_groups(page.groups, self.sort)
        widest = max((len(g.samples) for g in shown), default=1)
        side_by_side = (self.size.width or 80) // max(1, widest) >= SIDE_BY_SIDE_MIN
        parts: list[Any] = []
        for group in shown:
            parts.append(Text(""))
            parts.append(group_heading(group, len(page.groups)))
            parts.append(group_table(group, self.sort, side_by_side))
        body.update(RichGroup(*parts))

    def on_resize(self) -> None:
        if self.page is not None:
            self._draw()
