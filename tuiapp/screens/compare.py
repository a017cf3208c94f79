"""Compare runs: one metric of each on shared axes, or the reward-vs-KL frontier."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Static

from tuiapp.data import FRONTIER_X, SeriesData, Snapshot, frontier_points
from tuiapp.widgets.chart import Chart, run_colour
from tuiapp.widgets.plot import fmt_num

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
        Binding("s", "smoothing", "smooth"),
        Binding("y", "log_y", "log-y"),
        Binding("x", "x_axis", "step/time"),
    ]

    metric: reactive[str | None] = reactive(None)
    frontier: reactive[bool] = reactive(False)
    smoothing: reactive[float] = reactive(0.0)
    log_y: reactive[bool] = reactive(False)
    x_by_time: reactive[bool] = reactive(False)

    def __init__(self, run_ids: list[str]) -> None:
        super().__init__()
        self.run_ids = list(run_ids)
        self._snapshot: Snapshot | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="compare-title")
        yield Static(id="compare-legend")
        yield Chart(id="compare-chart")
        yield Static(id="compare-table")
        yield Footer()

    def on_mount(self) -> None:
        self.app.want.compare = tuple(self.run_ids)
        self.app.wake_reader()
        if self.app.snapshot is not None:
            self.apply_snapshot(self.app.snapshot)

    def on_unmount(self) -> None:
        self.app.want.compare = ()

    def apply_snapshot(self, snap: Snapshot) -> None:
        self._snapshot = snap
        if self.metric is None:
            self.metric = common_metric(snap.compare)
        self._redraw()

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
        if self.frontier:
            title.append("frontier: x = KL to the reference (kl/mean), y = held-out metric at each eval point", style="")
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
                table = Text("no run logged both kl/mean and eval/exact_match (or eval/rewards/accuracy) at an eval step yet", style="dim")
        else:
            title.append(f"metric: {self.metric or '-'} [m]   smooth {self.smoothing:g} [s]   log-y {'on' if self.log_y else 'off'} [y]   "
                         f"x: {'time' if self.x_by_time else 'step'} [x]   frontier [f]", style="dim")
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
            legend.append("■ ", style=run_colour(i))
            has = any(c[0] == names[rid] for c in curves)
            legend.append(f"{names[rid]}   ", style="" if has else "dim strike")
        self.query_one("#compare-title", Static).update(title)
        self.query_one("#compare-legend", Static).update(legend)
        self.query_one("#compare-table", Static).update(table)

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
                self.metric = chosen[0]
                self.frontier = False

        self.app.push_screen(MetricPicker(names, [self.metric] if self.metric else [], multiple=False, title="Metric"), done)

    def action_frontier(self) -> None:
        self.frontier = not self.frontier

    def action_smoothing(self) -> None:
        i = SMOOTHING_STEPS.index(self.smoothing) if self.smoothing in SMOOTHING_STEPS else 0
        self.smoothing = SMOOTHING_STEPS[(i + 1) % len(SMOOTHING_STEPS)]

    def action_log_y(self) -> None:
        self.log_y = not self.log_y

    def action_x_axis(self) -> None:
        self.x_by_time = not self.x_by_time
