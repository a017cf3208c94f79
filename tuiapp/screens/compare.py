"""Compare runs: one metric of each on shared axes, the reward-vs-KL frontier, or two runs'
samples side by side on the same prompts (2); under the chart, the settings that differ between them."""

from __future__ import annotations

from rich.console import Group
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Static

from tuiapp.data import FRONTIER_X, SampleSet, SeriesData, Snapshot, frontier_points, match_samples, move_step
from tuiapp.widgets.chart import Chart, run_colour
from tuiapp.widgets.plot import fmt_num
from tuiapp.widgets.samples import compare_pairs_table, compare_table
from tuiapp.widgets.spec_diff import SpecDiff

SMOOTHING_STEPS = (0.0, 0.6, 0.8, 0.9, 0.95, 0.99)


def common_metric(series: dict[str, dict[str, SeriesData]]) -> str | None:
    """The metric to start with: train/loss when every run logged it, else the most shared one."""
    counts: dict[str, int] = {}
    for by_name in series.values():
        for name in by_name:
            counts[name] = counts.get(name, 0) + 1
    if not counts:
        return None
    if counts.get("train/loss") == len(series):
        return "train/loss"
    return max(sorted(counts), key=lambda n: counts[n])


class CompareScreen(Screen):
    BINDINGS = [
        Binding("escape,v", "app.pop_screen", "back"),
        Binding("m", "pick_metric", "metric"),
        Binding("f", "frontier", "frontier (KL vs reward)"),
        Binding("2", "samples", "samples"),
        Binding("1", "curves", "curves", show=False),
        Binding("s", "smoothing", "smooth"),
        Binding("y", "log_y", "log-y"),
        Binding("x", "x_axis", "step/time"),
        Binding("r", "rollouts", "rollouts A|B", show=False),
        Binding("L", "label", "label A vs B", show=False),
        Binding("a", "next_run('a')", "run A", show=False),
        Binding("b", "next_run('b')", "run B", show=False),
        Binding("left_square_bracket", "sample_step('a', -1)", "A older", show=False, key_display="["),
        Binding("right_square_bracket", "sample_step('a', 1)", "A newer", show=False, key_display="]"),
        Binding("left_curly_bracket", "sample_step('b', -1)", "B older", show=False, key_display="{"),
        Binding("right_curly_bracket", "sample_step('b', 1)", "B newer", show=False, key_display="}"),
    ]

    metric: reactive[str | None] = reactive(None)
    frontier: reactive[bool] = reactive(False)
    smoothing: reactive[float] = reactive(0.0)
    log_y: reactive[bool] = reactive(False)
    x_by_time: reactive[bool] = reactive(False)
    samples: reactive[bool] = reactive(False)  # two runs' samples side by side instead of the curves
    pair: reactive[tuple[int, int]] = reactive((0, 1))  # runs A and B: positions in run_ids

    def __init__(self, run_ids: list[str]) -> None:
        super().__init__()
        self.run_ids = list(run_ids)
        self._snapshot: Snapshot | None = None
        self.sample_steps: dict[str, int | None] = {}  # run id -> the step wanted (None = its newest)
        self._metric_picked = False

    def compose(self) -> ComposeResult:
        yield Static(id="compare-title")
        yield Static(id="compare-legend")
        yield Chart(id="compare-chart")
        yield Static(id="compare-table")
        yield SpecDiff(id="compare-diff")
        with VerticalScroll(id="compare-samples"):
            yield Static(id="compare-samples-body")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#compare-samples").display = False
        self.app.want.compare = tuple(self.run_ids)
        self.app.wake_reader()
        if self.app.snapshot is not None:
            self.apply_snapshot(self.app.snapshot)

    def on_unmount(self) -> None:
        self.app.want.compare = ()
        self.app.want.compare_samples = ()

    def apply_snapshot(self, snap: Snapshot) -> None:
        self._snapshot = snap
        if not self._metric_picked:  # until one is picked (m), follow what the runs have logged so far
            shared = common_metric(snap.compare)
            if shared is not None and shared != self.metric:
                self.metric = shared
        self._redraw()
        if self.samples:
            self._redraw_samples()

    # ------------------------------------------------------------------ samples side by side

    @property
    def run_a(self) -> str | None:
        return self.run_ids[self.pair[0]] if len(self.run_ids) >= 2 else None

    @property
    def run_b(self) -> str | None:
        return self.run_ids[self.pair[1]] if len(self.run_ids) >= 2 else None

    def _want_samples(self) -> None:
        """Ask the store reader for A's and B's rows at their chosen steps."""
        if self.samples and self.run_a and self.run_b:
            self.app.want.compare_samples = tuple((rid, self.sample_steps.get(rid)) for rid in (self.run_a, self.run_b))
        else:
            self.app.want.compare_samples = ()
        self.app.wake_reader()

    def _sample_set(self, rid: str) -> SampleSet | None:
        got = self._snapshot.compare_samples.get(rid) if self._snapshot else None
        if got is None:
            return None
        wanted = self.sample_steps.get(rid)
        if wanted is not None and got.step != wanted and wanted in got.steps:
            return None  # the reader has not read the newly chosen step yet
        if wanted is None and got.steps and got.step != got.steps[-1]:
            return None  # back to the newest: not read yet
        return got

    def _run_heading(self, letter: str, rid: str, keys: str) -> Text:
        names = self._names()
        colour = run_colour(self.run_ids.index(rid))
        got = self._sample_set(rid)
        text = Text(f"{letter} ", style=f"bold {colour}")
        text.append("■ ", style=colour)
        text.append(names[rid], style="bold")
        if got is None:
            text.append("  reading…", style="dim")
        elif got.step is None:
            text.append("  no samples logged yet", style="dim")
        else:
            pos = got.steps.index(got.step) + 1 if got.step in got.steps else len(got.steps)
            text.append(f"  step {got.step}")
            text.append(f" ({pos} of {len(got.steps)}, {keys})", style="dim")
        return text

    def _redraw_samples(self) -> None:
        body = self.query_one("#compare-samples-body", Static)
        a, b = self.run_a, self.run_b
        if a is None or b is None:
            body.update(
                Text(
                    "select two runs or more (space in the runs list), then v and 2, to read their samples "
                    "side by side",
                    style="dim",
                )
            )
            return
        heading = self._run_heading("A", a, "[ ]")
        heading.append("   ")
        heading.append_text(self._run_heading("B", b, "{ }"))
        if len(self.run_ids) > 2:
            heading.append("   a/b: other runs", style="dim")
        got_a, got_b = self._sample_set(a), self._sample_set(b)
        parts: list = [heading]
        if got_a is None or got_b is None:
            body.update(Group(*parts))
            return
        if not got_a.rows or not got_b.rows:
            parts.append(Text("waiting for both runs to log samples (every sample_steps steps)", style="dim"))
            body.update(Group(*parts))
            return
        matched = match_samples(got_a.rows, got_b.rows)
        colour_a, colour_b = run_colour(self.run_ids.index(a)), run_colour(self.run_ids.index(b))
        summary = Text(f"{len(matched.shared)} shared prompts", style="bold")
        if matched.shared:
            summary.append(
                f"   {matched.differing} differ (first)" if matched.differing else "   none differ",
                style="yellow" if matched.differing else "dim",
            )
            for letter, side in (("A", 1), ("B", 2)):
                scores = [
                    t[side].get("policy_score") for t in matched.shared if t[side].get("policy_score") is not None
                ]
                if scores:
                    summary.append(f"   {letter} {sum(1 for v in scores if v >= 1)}/{len(scores)} ✓")
        for letter, only in (("A", matched.only_a), ("B", matched.only_b)):
            if only:
                summary.append(f"   +{only} only in {letter}", style="dim")
        parts.append(summary)
        if matched.shared:
            parts.append(compare_table(matched.shared, colour_a, colour_b))
        if matched.pairs:
            parts.append(Text(""))
            ahead = [sum(1 for t in matched.pairs if (t[side].get("margin") or 0) > 0) for side in (1, 2)]
            n = len(matched.pairs)
            parts.append(
                Text(f"{n} held-out pairs in both: chosen ahead in A {ahead[0]}/{n}, in B {ahead[1]}/{n}", style="bold")
            )
            parts.append(compare_pairs_table(matched.pairs, colour_a, colour_b))
        if not matched.shared and not matched.pairs:
            parts.append(
                Text(
                    "no prompt appears in both runs' samples at these steps (prompts are matched by their text)",
                    style="dim",
                )
            )
        body.update(Group(*parts))

    def watch_samples(self, samples: bool) -> None:
        box = self.query_one("#compare-samples")
        box.display = samples
        if samples:
            box.focus()  # up/down/page keys scroll the rows
        self.query_one("#compare-chart").display = not samples
        self.query_one("#compare-table").display = not samples
        self.query_one("#compare-diff").display = not samples
        self._want_samples()
        self._redraw()
        if samples:
            self._redraw_samples()

    def watch_pair(self) -> None:
        self._want_samples()
        if self.samples:
            self._redraw_samples()
            self._redraw()

    def action_rollouts(self) -> None:
        """Runs A's and B's training rollouts on the same prompts, at their newest stored steps."""
        if self.run_a is None or self.run_b is None:
            self.notify("select two runs or more (space in the runs list), then v and r", severity="warning")
            return
        from tuiapp.screens.rollout_compare import RolloutCompareScreen

        self.app.push_screen(RolloutCompareScreen([(self.run_a, None), (self.run_b, None)]))

    def action_label(self) -> None:
        """Label A's answer against B's on the prompts both logged samples of (the steps shown in 2)."""
        a, b = self.run_a, self.run_b
        got_a, got_b = (self._sample_set(a), self._sample_set(b)) if a and b else (None, None)
        run = next((r for r in self._snapshot.runs if r.id == a), None) if self._snapshot else None
        if got_a is None or got_b is None or run is None:
            self.notify("open two runs' samples side by side first (2)", severity="warning")
            return
        from tuiapp.labels import run_candidates
        from tuiapp.screens.label import LabelScreen

        candidates = run_candidates(match_samples(got_a.rows, got_b.rows), a, got_a.step, b, got_b.step)
        self.app.push_screen(LabelScreen(candidates, run, f"A vs B samples (steps {got_a.step}, {got_b.step})"))

    def action_samples(self) -> None:
        self.samples = not self.samples

    def action_curves(self) -> None:
        self.samples = False

    def action_next_run(self, which: str) -> None:
        """Run A (or B) becomes the next selected run that is not the other one."""
        n = len(self.run_ids)
        if n < 3:
            if n == 2:
                self.pair = (self.pair[1], self.pair[0])  # two runs: swap them
            return
        a, b = self.pair
        mine, other = (a, b) if which == "a" else (b, a)
        nxt = (mine + 1) % n
        if nxt == other:
            nxt = (nxt + 1) % n
        self.pair = (nxt, b) if which == "a" else (a, nxt)
        self.samples = True

    def action_sample_step(self, which: str, delta: int) -> None:
        if not self.samples:
            self.samples = True
            return
        rid = self.run_a if which == "a" else self.run_b
        got = self._snapshot.compare_samples.get(rid) if (rid and self._snapshot) else None
        if got is None or not got.steps:
            return
        wanted = self.sample_steps.get(rid)
        step = move_step(got.steps, wanted if wanted in got.steps else got.step, delta)
        self.sample_steps[rid] = None if step == got.steps[-1] else step
        self._want_samples()
        self._redraw_samples()  # "reading…" until the reader brings that step's rows

    def _names(self) -> dict[str, str]:
        runs = {r.id: r for r in self._snapshot.runs} if self._snapshot else {}
        return {rid: (runs[rid].name if rid in runs else rid) for rid in self.run_ids}

    def _redraw(self) -> None:
        chart = self.query_one(Chart)
        snap = self._snapshot
        title = Text("Compare ", style="bold")
        title.append(f"{len(self.run_ids)} run{'s' if len(self.run_ids) != 1 else ''}  ", style="dim")
        data = snap.compare if snap else {}
        names = self._names()
        curves = []
        table = Text()
        if self.samples:
            title.append("samples on shared prompts  a/b runs  [ ] { } steps  2 curves", style="dim")
        elif self.frontier:
            title.append(
                "frontier: x = KL to the reference (kl/mean), y = held-out metric at each eval point", style=""
            )
            y_name = None
            for i, rid in enumerate(self.run_ids):
                points = frontier_points(data.get(rid, {}))
                if points is None:
                    continue
                y_name, xs, ys = points
                curves.append((names[rid], xs, ys, run_colour(i)))
                table.append(f"{names[rid]}: ", style=run_colour(i))
                table.append(", ".join(f"({fmt_num(x)}, {fmt_num(y)})" for x, y in zip(xs, ys)) + "\n")
            chart.title = f"{y_name or 'eval metric'} vs {FRONTIER_X}"
            chart.x_label = FRONTIER_X
            chart.scatter = True
            chart.smoothing = 0.0
            if not curves:
                table = Text(
                    "no run logged both kl/mean and eval/exact_match (or eval/rewards/accuracy) at an eval step yet",
                    style="dim",
                )
        else:
            title.append(
                f"metric: {self.metric or '-'} [m]   smooth {self.smoothing:g} [s]   log-y {'on' if self.log_y else 'off'} [y]   "
                f"x: {'time' if self.x_by_time else 'step'} [x]   frontier [f]   samples [2]",
                style="dim",
            )
            for i, rid in enumerate(self.run_ids):
                s = data.get(rid, {}).get(self.metric or "")
                if s is None:
                    continue
                xs = [t - s.times[0] for t in s.times] if self.x_by_time else list(s.steps)
                curves.append((names[rid], xs, list(s.values), run_colour(i)))
            chart.title = self.metric or ""
            chart.x_label = "seconds" if self.x_by_time else "step"
            chart.scatter = False
            chart.smoothing = self.smoothing
        chart.log_y = self.log_y
        chart.curves = curves
        legend = Text()
        for i, rid in enumerate(self.run_ids):
            if self.samples and rid in (self.run_a, self.run_b):
                legend.append("A:" if rid == self.run_a else "B:", style=f"bold {run_colour(i)}")
            legend.append("■ ", style=run_colour(i))
            has = self.samples or any(c[0] == names[rid] for c in curves)
            legend.append(f"{names[rid]}   ", style="" if has else "dim strike")
        self.query_one("#compare-title", Static).update(title)
        legend_box = self.query_one("#compare-legend", Static)
        legend_box.update(legend)
        legend_box.display = not self.samples or len(self.run_ids) > 2  # two runs: the samples heading names them
        self.query_one("#compare-table", Static).update(table)
        runs = {r.id: r for r in snap.runs} if snap else {}
        self.query_one(SpecDiff).runs = [
            (names[rid], run_colour(i), runs[rid].spec) for i, rid in enumerate(self.run_ids) if rid in runs
        ]

    def watch_metric(self) -> None:
        self._redraw()

    def watch_frontier(self) -> None:
        self._redraw()

    def watch_smoothing(self) -> None:
        self._redraw()

    def watch_log_y(self) -> None:
        self._redraw()

    def watch_x_by_time(self) -> None:
        self._redraw()

    def action_pick_metric(self) -> None:
        from tuiapp.screens.pickers import MetricPicker

        names = sorted({n for by_name in (self._snapshot.compare if self._snapshot else {}).values() for n in by_name})
        if not names:
            self.notify("these runs have logged no metrics yet", severity="warning")
            return

        def done(chosen: list[str] | None) -> None:
            if chosen:
                self._metric_picked = True
                self.metric = chosen[0]
                self.frontier = False
                self.samples = False

        self.app.push_screen(
            MetricPicker(names, [self.metric] if self.metric else [], multiple=False, title="Metric"), done
        )

    def action_frontier(self) -> None:
        self.frontier = not self.frontier if not self.samples else True
        self.samples = False

    def action_smoothing(self) -> None:
        i = SMOOTHING_STEPS.index(self.smoothing) if self.smoothing in SMOOTHING_STEPS else 0
        self.smoothing = SMOOTHING_STEPS[(i + 1) % len(SMOOTHING_STEPS)]

    def action_log_y(self) -> None:
        self.log_y = not self.log_y

    def action_x_axis(self) -> None:
        self.x_by_time = not self.x_by_time
