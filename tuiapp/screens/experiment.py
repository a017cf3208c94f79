"""One experiment: its runs' curves overlaid and coloured by a swept setting's value, the reward-vs-KL
frontier across its runs (Pareto-optimal runs marked), a table of each run's swept values and best /
final key metric (best first), and the settings that differ between its runs."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Static

from tuiapp.data import FRONTIER_X, GLYPHS, RunInfo, Snapshot
from tuiapp.experiment import RunResult, experiment_metric, results, swept_keys, value_colours
from tuiapp.widgets.chart import Chart
from tuiapp.widgets.plot import fmt_num
from tuiapp.widgets.runs_table import SHORT_METRIC
from tuiapp.widgets.spec_diff import SpecDiff

WIDE = 110  # columns from which the curves and the frontier sit side by side
FRONT = "pareto front"


def short_name(run: RunInfo) -> str:
    """A run's name without its experiment's prefix (the sweep names runs experiment-point)."""
    if run.experiment and run.name.startswith(run.experiment + "-"):
        return run.name[len(run.experiment) + 1 :]
    return run.name


def short_metric(name: str | None) -> str:
    if not name:
        return "-"
    return SHORT_METRIC.get(name, name.split("/")[-1][:8])


def results_table(rows: list[RunResult], keys: list[str], colours: dict[str, str], metric: str | None, y_name) -> Table:
    """Each run: rank, swatch and name, status, swept values, best and final metric, the frontier point."""
    table = Table(box=None, padding=(0, 1), pad_edge=False, show_edge=False, header_style="bold dim")
    table.add_column("#", justify="right")
    table.add_column("run", no_wrap=True, max_width=22, overflow="ellipsis")
    for key in keys:
        table.add_column(key.split(".")[-1], justify="right", no_wrap=True)
    m = short_metric(metric)
    table.add_column(f"best {m}", justify="right")
    table.add_column("final", justify="right")
    table.add_column("KL", justify="right")
    table.add_column(short_metric(y_name) if y_name else "reward", justify="right")
    table.add_column("★", justify="center")
    for i, row in enumerate(rows, 1):
        glyph, status_colour = GLYPHS.get(row.run.status, ("?", "white"))
        name = Text("■ ", style=colours.get(row.run.id, "white"))
        name.append(f"{glyph} ", style=status_colour)
        name.append(short_name(row.run))
        table.add_row(
            str(i),
            name,
            *(Text(str(row.values.get(k, "-"))) for k in keys),  # Text: a str cell would be read as markup
            Text(fmt_num(row.best) if row.best is not None else "-", style="bold" if i == 1 else ""),
            fmt_num(row.final) if row.final is not None else "-",
            fmt_num(row.kl) if row.kl is not None else "-",
            fmt_num(row.reward) if row.reward is not None else "-",
            Text("★", style="bold yellow") if row.on_front else "",
        )
    return table


class ExperimentScreen(Screen):
    BINDINGS = [
        Binding("escape,e", "app.pop_screen", "back"),
        Binding("m", "pick_metric", "metric"),
        Binding("c", "colour_by", "colour by"),
        Binding("f", "frontier", "frontier"),
        Binding("s", "smoothing", "smooth", show=False),
        Binding("y", "log_y", "log-y", show=False),
    ]

    metric: reactive[str | None] = reactive(None)  # the curves' metric (default: the key metric)
    colour_key: reactive[str | None] = reactive(None)  # the swept setting the colours stand for
    frontier: reactive[bool] = reactive(False)  # narrow screens: the frontier instead of the curves
    smoothing: reactive[float] = reactive(0.0)
    log_y: reactive[bool] = reactive(False)

    def __init__(self, name: str) -> None:
        super().__init__()
        self.experiment = name
        self._snapshot: Snapshot | None = None
        self._metric_picked = False

    def compose(self) -> ComposeResult:
        yield Static(id="exp-title")
        yield Static(id="exp-legend")
        with Horizontal(id="exp-charts"):
            yield Chart(id="exp-curves")
            yield Chart(id="exp-frontier")
        yield Static(id="exp-table")
        yield SpecDiff(id="exp-diff")
        yield Footer()

    def on_mount(self) -> None:
        chart = self.query_one("#exp-curves", Chart)
        chart.title_values = False  # six runs' last values do not fit a title line; the table has them
        frontier = self.query_one("#exp-frontier", Chart)
        frontier.scatter = True
        frontier.title_values = False
        frontier.x_label = FRONTIER_X
        frontier.lines = (FRONT,)
        self._layout()
        if self.app.snapshot is not None:
            self.apply_snapshot(self.app.snapshot)

    def on_unmount(self) -> None:
        self.app.want.compare = ()

    def on_resize(self) -> None:
        self._layout()

    def _layout(self) -> None:
        wide = self.size.width >= WIDE
        self.query_one("#exp-curves").display = wide or not self.frontier
        self.query_one("#exp-frontier").display = wide or self.frontier

    @property
    def runs(self) -> list[RunInfo]:
        snap = self._snapshot
        return [r for r in snap.runs if r.experiment == self.experiment] if snap else []

    def apply_snapshot(self, snap: Snapshot) -> None:
        self._snapshot = snap
        ids = tuple(r.id for r in self.runs)
        if ids != self.app.want.compare:  # the store reader brings these runs' series
            self.app.want.compare = ids
            self.app.wake_reader()
        if self.colour_key is None:
            keys = swept_keys(self.runs)
            if keys:
                self.colour_key = keys[0]
        if not self._metric_picked:
            metric, _ = experiment_metric(self.runs)
            if metric is not None and metric != self.metric:
                self.metric = metric
        self._redraw()

    def colours(self) -> tuple[dict[str, str], dict[str, str]]:
        """(run id -> colour, value -> colour) for the colour key's values."""
        runs = self.runs
        key = self.colour_key
        by_value = value_colours([r.swept.get(key, "-") for r in runs]) if key else {}
        return {r.id: by_value.get(str(r.swept.get(key, "-")), "white") for r in runs}, by_value

    def _redraw(self) -> None:
        runs = self.runs
        series = self._snapshot.compare if self._snapshot else {}
        key_metric, lower = experiment_metric(runs)
        rows, y_name = results(runs, series, key_metric, lower)
        by_run, by_value = self.colours()
        keys = swept_keys(runs)

        title = Text(f"Experiment {self.experiment}", style="bold")
        counts: dict[str, int] = {}
        for run in runs:
            counts[run.status] = counts.get(run.status, 0) + 1
        title.append(f"  {len(runs)} runs ", style="dim")
        for status, n in counts.items():
            glyph, colour = GLYPHS.get(status, ("?", "white"))
            title.append(f"{n}{glyph} ", style=colour)
        if key_metric:
            title.append(f" by {key_metric} ({'lower' if lower else 'higher'} is better)", style="dim")
        self.query_one("#exp-title", Static).update(title)

        legend = Text()
        if self.colour_key:
            legend.append(f"{self.colour_key} ", style="bold")
            for value, colour in by_value.items():
                legend.append("■ ", style=colour)
                legend.append(f"{value}  ")
            if len(keys) > 1:
                legend.append("[c] colour by another", style="dim")
        else:
            legend.append("these runs swept no setting", style="dim")
        self.query_one("#exp-legend", Static).update(legend)

        curves_chart = self.query_one("#exp-curves", Chart)
        curves = []
        for run in runs:
            s = series.get(run.id, {}).get(self.metric or "")
            if s is not None:
                curves.append((short_name(run), list(s.steps), list(s.values), by_run[run.id]))
        curves_chart.title = f"{self.metric or 'metric'} [m]"
        curves_chart.smoothing = self.smoothing
        curves_chart.log_y = self.log_y
        curves_chart.curves = curves

        frontier = self.query_one("#exp-frontier", Chart)
        points = [r for r in rows if r.kl is not None and r.reward is not None]
        front = sorted((r for r in points if r.on_front), key=lambda r: r.kl)
        # the front's line first, so each run's point is drawn over it in the run's colour
        dots = [(FRONT, [r.kl for r in front], [r.reward for r in front], "grey50")] if len(front) > 1 else []
        dots += [(short_name(r.run), [r.kl], [r.reward], by_run[r.run.id]) for r in points]
        frontier.title = f"{y_name or 'eval metric'} vs KL (final; ★ Pareto)"
        frontier.curves = dots

        self.query_one("#exp-table", Static).update(
            results_table(rows, keys, by_run, key_metric, y_name)
            if runs
            else Text(f"no runs in experiment {self.experiment}", style="dim")
        )
        order = {row.run.id: i for i, row in enumerate(rows)}
        ordered = sorted(runs, key=lambda r: order.get(r.id, len(order)))
        self.query_one(SpecDiff).runs = [(short_name(r), by_run[r.id], r.spec) for r in ordered]

    def watch_metric(self) -> None:
        if self._snapshot is not None:
            self._redraw()

    def watch_colour_key(self) -> None:
        if self._snapshot is not None:
            self._redraw()

    def watch_smoothing(self) -> None:
        if self._snapshot is not None:
            self._redraw()

    def watch_log_y(self) -> None:
        if self._snapshot is not None:
            self._redraw()

    def watch_frontier(self) -> None:
        self._layout()

    def action_colour_by(self) -> None:
        keys = swept_keys(self.runs)
        if len(keys) < 2:
            self.notify("only one setting was swept", severity="information")
            return
        i = keys.index(self.colour_key) if self.colour_key in keys else -1
        self.colour_key = keys[(i + 1) % len(keys)]

    def action_frontier(self) -> None:
        if self.size.width >= WIDE:
            self.notify("the frontier is beside the curves on a wide screen", severity="information")
            return
        self.frontier = not self.frontier

    def action_smoothing(self) -> None:
        from tuiapp.screens.compare import SMOOTHING_STEPS

        i = SMOOTHING_STEPS.index(self.smoothing) if self.smoothing in SMOOTHING_STEPS else 0
        self.smoothing = SMOOTHING_STEPS[(i + 1) % len(SMOOTHING_STEPS)]

    def action_log_y(self) -> None:
        self.log_y = not self.log_y

    def action_pick_metric(self) -> None:
        from tuiapp.screens.pickers import MetricPicker

        snap = self._snapshot
        names = sorted({n for by_name in (snap.compare if snap else {}).values() for n in by_name})
        if not names:
            self.notify("these runs have logged no metrics yet", severity="warning")
            return

        def done(chosen: list[str] | None) -> None:
            if chosen:
                self._metric_picked = True
                self.metric = chosen[0]
                self.frontier = False

        self.app.push_screen(
            MetricPicker(names, [self.metric] if self.metric else [], multiple=False, title="Metric"), done
        )
