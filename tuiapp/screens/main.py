"""The main screen: runs on the left, the focused run's curves, samples, rollouts, log and spec on the right."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Container, Horizontal, Vertical, VerticalScroll
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Static, TabbedContent, TabPane

from jobs.store import STATUSES
from tuiapp.data import RunDetail, RunInfo, Snapshot, default_metrics, move_step
from tuiapp.experiment import Group, group_name, grouped
from tuiapp.screens.run_text import latest_text, matches, run_title, short_home, spec_text, sys_text
from tuiapp.widgets.chart import Chart
from tuiapp.widgets.rollouts import RolloutsView
from tuiapp.widgets.runs_table import SORTS, RunsTable, sort_runs
from tuiapp.widgets.samples import SamplesView

SMOOTHING_STEPS = (0.0, 0.6, 0.8, 0.9, 0.95, 0.99)
STATUS_FILTERS = (None, "live") + STATUSES
SORT_OF_COLUMN = {
    "age": "created",
    "run": "created",
    "status": "status",
    "algo": "algorithm",
    "metric": "metric",
}  # header clicks


class MainScreen(Screen):
    BINDINGS = [
        Binding("n", "new_run", "new run"),
        Binding("c", "cancel_run", "cancel"),
        Binding("r", "resume_run", "resume"),
        Binding("d", "delete_run", "delete"),
        Binding("space", "toggle_select", "select", show=True),
        Binding("v", "compare", "compare"),
        Binding("e", "experiment", "experiment"),
        Binding("g", "fold", "fold group", show=False),
        Binding("m", "pick_metrics", "metrics"),
        Binding("slash", "filter", "filter", key_display="/"),
        Binding("f", "status_filter", "status"),
        Binding("o", "sort", "sort"),
        Binding("s", "smoothing", "smooth", show=False),
        Binding("y", "log_y", "log-y", show=False),
        Binding("x", "x_axis", "x axis", show=False),
        Binding("left_square_bracket", "sample_step(-1)", "older samples", show=False, key_display="["),
        Binding("right_square_bracket", "sample_step(1)", "newer samples", show=False, key_display="]"),
        Binding("p", "pairs_first", "pairs first", show=False),
        Binding("1", "tab('tab-curves')", "curves", show=False),
        Binding("2", "tab('tab-samples')", "samples", show=False),
        Binding("3", "tab('tab-log')", "log", show=False),
        Binding("l", "tab('tab-log')", "log", show=False),
        Binding("4", "tab('tab-spec')", "spec", show=False),
        Binding("5", "tab('tab-rollouts')", "rollouts", show=False),
        Binding("L", "label", "label", show=False),
        Binding("escape", "back", "back", show=False),
    ]

    filter_text: reactive[str] = reactive("")
    status_filter: reactive[str | None] = reactive(None)
    smoothing: reactive[float] = reactive(0.0)
    log_y: reactive[bool] = reactive(False)
    x_by_time: reactive[bool] = reactive(False)
    full: reactive[bool] = reactive(False)
    sort_by: reactive[str] = reactive("created")

    def __init__(self) -> None:
        super().__init__()
        self.selected: list[str] = []  # in selection order: a run's colour in the compare view
        self.chosen_metrics: list[str] | None = None  # None = the algorithm's default set
        self._snapshot: Snapshot | None = None
        self._shown_runs: list[RunInfo] = []
        self._rows: list[RunInfo | Group] = []  # the table's rows: runs and experiment group rows
        self.collapsed: set[str] = set()  # experiments whose runs are folded under their group row
        self._n_charts = 0
        self._remounting = False  # charts being replaced (see _remount_charts)
        self._remounts = 0  # remounts since the charts last matched what should be shown

    def compose(self) -> ComposeResult:
        yield Static(id="topbar")
        with Horizontal(id="body"):
            with Vertical(id="runs-pane"):
                yield RunsTable(id="runs")
                yield Input(placeholder="filter runs (text; esc clears)", id="filter")
                yield Static(id="filter-status")
            with Vertical(id="detail"):
                yield Static("no run selected", id="run-title")
                with TabbedContent(id="tabs", initial="tab-curves"):
                    with TabPane("Curves", id="tab-curves"):
                        yield Static(id="chart-controls")
                        yield Container(id="charts")
                        yield Static(id="latest")
                        yield Static(id="sys")
                    with TabPane("Samples", id="tab-samples"):
                        yield SamplesView(id="samples")
                    with TabPane("Rollouts", id="tab-rollouts"):
                        yield RolloutsView(id="rollouts")
                    with TabPane("Log", id="tab-log"):
                        with VerticalScroll(id="log-scroll"):
                            yield Static(id="log")
                    with TabPane("Spec", id="tab-spec"):
                        with VerticalScroll(id="spec-scroll"):
                            yield Static(id="spec")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#filter").display = False
        self.query_one(RunsTable).focus()
        self._update_controls()
        if self.app.snapshot is not None:
            self.apply_snapshot(self.app.snapshot)

    # ------------------------------------------------------------------ data in

    def apply_snapshot(self, snap: Snapshot) -> None:
        self._snapshot = snap
        self._remounts = 0
        self._render_topbar(snap)
        self._render_runs()
        detail = snap.detail
        if detail is not None and detail.run.id == self.app.want.focus:
            self._render_detail(detail)
        elif not self._shown_runs:
            self.query_one("#run-title", Static).update(Text("no runs yet: press n to start one", style="dim"))

    def render_topbar(self) -> None:
        """The top bar again (the app's store problem changed): from the last snapshot, if any."""
        if self._snapshot is not None:
            self._render_topbar(self._snapshot)
        elif self.app.store_problem:
            text = Text(" Cherry ", style="bold reverse red")
            text.append(f"  {self.app.store_problem}", style="bold red")
            self.query_one("#topbar", Static).update(text)

    def _render_topbar(self, snap: Snapshot) -> None:
        text = Text()
        text.append(" Cherry ", style="bold reverse red")
        if self.app.store_problem:  # the runs below are the last ones read
            text.append(f"  {self.app.store_problem} ·", style="bold red")
        busy, slots = snap.busy_slots
        workers = (
            f"{snap.live_workers} worker{'s' if snap.live_workers != 1 else ''} ({busy}/{slots} busy)"
            if snap.live_workers
            else "no worker"
        )
        text.append(
            f"  {snap.running} running · {snap.pending} queued · {workers}",
            style="green" if snap.running else "yellow" if snap.pending else "dim",
        )
        # Then what fits, most useful first: the cure for a stuck queue, the queue, the home.
        width = self.size.width or self.app.size.width
        home = self.app.home_label or short_home(snap.home, max(12, width - 60))
        for part, style in (
            (" (run cherry worker)" if snap.pending and not snap.live_workers else "", "yellow"),
            (f"  queue: {snap.backend}", "dim"),
            (f"  home: {home}", ""),
        ):
            if part and text.cell_len + len(part) <= width:
                text.append(part, style=style)
        self.query_one("#topbar", Static).update(text)

    def _render_runs(self) -> None:
        if self._snapshot is None:
            return
        runs = sort_runs(
            [r for r in self._snapshot.runs if matches(r, self.filter_text, self.status_filter)], self.sort_by
        )
        self._shown_runs = runs
        self._rows = grouped(runs, self.collapsed)
        table = self.query_one(RunsTable)
        table.show(self._rows, set(self.selected), self.app.now())
        wanted = self.app.initial_focus
        keys = [r.key if isinstance(r, Group) else r.id for r in self._rows]
        if wanted is not None and wanted in keys:
            self.app.initial_focus = None  # once: afterwards the cursor is the user's
            table.move_cursor(row=keys.index(wanted), animate=False)
        parts = []
        if self.filter_text:
            parts.append(f"filter: /{self.filter_text}")
        if self.status_filter:
            parts.append(f"status: {self.status_filter}")
        if self.sort_by != "created":
            parts.append(f"sort: {self.sort_by}")
        parts.append(f"{len(runs)} of {len(self._snapshot.runs)} runs")
        if self.selected:
            parts.append(f"{len(self.selected)} selected (v compare)")
        self.query_one("#filter-status", Static).update(Text("  ".join(parts), style="dim"))
        focus = self._run_of(table.current_key)
        if focus != self.app.want.focus:
            self.app.focus_run(focus)

    def _render_detail(self, detail: RunDetail) -> None:
        run = detail.run
        title = self.query_one("#run-title", Static)
        title.update(run_title(run, self.app.now(), title.size.width or 80))
        self._render_charts(detail)
        self.query_one(SamplesView).show(detail.sample_steps, detail.sample_step, detail.samples)
        self.query_one(RolloutsView).show_run(run, self._rollouts_active)
        log_widget = self.query_one("#log", Static)
        log_text = detail.log or (run.error or f"(no log yet: the run is {run.status})")
        log_widget.update(Text(log_text))
        scroll = self.query_one("#log-scroll", VerticalScroll)
        if scroll.is_vertical_scroll_end or scroll.max_scroll_y == 0:
            scroll.call_after_refresh(scroll.scroll_end, animate=False)
        self.query_one("#spec", Static).update(spec_text(run, detail.events))

    def _render_charts(self, detail: RunDetail) -> None:
        available = sorted(detail.series)
        names = [m for m in (self.chosen_metrics or []) if m in detail.series] or default_metrics(
            detail.run.algorithm, available
        )
        box = self.query_one("#charts", Container)
        if box.size.height:  # as many charts as fit at >= 6 rows each; the rest via m
            cols = 2 if box.size.width >= 90 else 1
            fit = max(1, box.size.height // 6) * cols
            hidden = names[fit:]
            names = names[:fit]
        else:
            hidden = []
        charts = {c.name: c for c in box.query(Chart)}
        wanted = [f"m-{i}" for i in range(len(names))]
        if list(charts) != wanted:
            if self._remounting:
                return  # the charts are being replaced; the remount renders again when done
            if self._remounts < 3:  # a layout that flips between two counts must not loop: keep what is there
                self._remounting = True
                self._remounts += 1
                self.run_worker(self._remount_charts(len(names)), group="charts", exclusive=True)
                return
            names, hidden = names[: len(charts)], hidden + names[len(charts) :]
        else:
            self._remounts = 0
        widgets = list(charts.values())
        for i, name in enumerate(names):
            chart = widgets[i]
            s = detail.series[name]
            start = detail.run.started_at or (s.times[0] if s.times else 0)
            xs = [t - start for t in s.times] if self.x_by_time else list(s.steps)
            chart.title = name
            chart.smoothing = self.smoothing
            chart.log_y = self.log_y
            chart.x_label = "seconds" if self.x_by_time else "step"
            chart.curves = [(name, xs, list(s.values), "dodger_blue1")]
        self.query_one("#latest", Static).update(latest_text(detail, names, hidden))
        figures = sys_text(detail)
        sys_line = self.query_one("#sys", Static)
        sys_line.update(figures)
        sys_line.display = bool(figures)

    async def _remount_charts(self, n: int) -> None:
        """Replace the charts by `n` new ones, waiting for each step, so no query sees both sets."""
        try:
            box = self.query_one("#charts", Container)
            await box.remove_children()
            await box.mount_all([Chart(name=f"m-{i}", classes="chart") for i in range(n)])
            self._n_charts = n
            self._layout_charts()
        finally:
            self._remounting = False
        self.call_after_refresh(self._render_charts_again)

    def _layout_charts(self) -> None:
        """Charts in a grid: two columns when the pane is wide enough, rows sharing the height."""
        box = self.query_one("#charts", Container)
        n = self._n_charts or 1
        cols = 2 if box.size.width >= 90 or (box.size.width >= 60 and n > 2 and box.size.height < 20) else 1
        if n == 1:
            cols = 1
        box.styles.grid_size_columns = cols
        box.styles.grid_size_rows = -(-n // cols)

    def on_resize(self) -> None:
        self.call_after_refresh(self._layout_charts)
        if self._snapshot is not None:
            self._render_topbar(self._snapshot)

    def _render_charts_again(self) -> None:
        snap = self._snapshot
        if snap is not None and snap.detail is not None and snap.detail.run.id == self.app.want.focus:
            self._render_charts(snap.detail)

    def _update_controls(self) -> None:
        text = Text()
        text.append("smooth ", style="dim")
        text.append(f"{self.smoothing:g}")
        text.append(" [s]   log-y ", style="dim")
        text.append("on" if self.log_y else "off")
        text.append(" [y]   x: ", style="dim")
        text.append("time" if self.x_by_time else "step")
        text.append(" [x]   metrics [m]", style="dim")
        self.query_one("#chart-controls", Static).update(text)
        self._render_charts_again()

    def watch_smoothing(self) -> None:
        self._update_controls()

    def watch_log_y(self) -> None:
        self._update_controls()

    def watch_x_by_time(self) -> None:
        self._update_controls()

    def watch_full(self, full: bool) -> None:
        self.query_one("#runs-pane").display = not full

    # ------------------------------------------------------------------ events

    def _group(self, name: str | None) -> Group | None:
        return next((r for r in self._rows if isinstance(r, Group) and r.name == name), None)

    def _run_of(self, key: str | None) -> str | None:
        """The run a row stands for: itself, or on a group row the experiment's best run."""
        name = group_name(key)
        if name is None:
            return key
        group = self._group(name)
        return group.best.id if group is not None and group.best is not None else None

    @on(DataTable.RowHighlighted, "#runs")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        run_id = self._run_of(event.row_key.value if event.row_key is not None else None)
        if run_id != self.app.want.focus:
            self.app.focus_run(run_id)
            self.query_one(SamplesView).show([], None, [])

    @on(DataTable.HeaderSelected, "#runs")
    def _header_clicked(self, event: DataTable.HeaderSelected) -> None:
        key = SORT_OF_COLUMN.get(str(event.column_key.value))
        if key is not None:
            self.sort_by = key
            self._render_runs()

    @on(DataTable.RowSelected, "#runs")
    def _selected(self, event: DataTable.RowSelected) -> None:
        name = group_name(event.row_key.value if event.row_key is not None else None)
        if name is not None:  # enter or a click on a group row folds or unfolds it
            self.fold(name)
        else:
            self.full = True

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value.strip()
        self._render_runs()

    @on(Input.Submitted, "#filter")
    def _filter_done(self, event: Input.Submitted) -> None:
        self.query_one(RunsTable).focus()
        self.query_one("#filter").display = bool(self.filter_text)

    @property
    def _rollouts_active(self) -> bool:
        return self.query_one(TabbedContent).active == "tab-rollouts"

    @on(TabbedContent.TabActivated, "#tabs")
    def _tab_shown(self, event: TabbedContent.TabActivated) -> None:
        if self._rollouts_active:  # read now: the tab reads only while it is shown
            snap = self._snapshot
            run = snap.detail.run if snap and snap.detail and snap.detail.run.id == self.app.want.focus else None
            view = self.query_one(RolloutsView)
            view.show_run(run, True)
            view.focus()  # its keys: ←/→ steps, o sort, j moved most, w vs step

    @on(SamplesView.StepRequested)
    def _sample_step(self, event: SamplesView.StepRequested) -> None:
        self.action_sample_step(event.delta)

    # ------------------------------------------------------------------ actions

    def current_run(self) -> RunInfo | None:
        run_id = self.query_one(RunsTable).current_run_id
        return next((r for r in self._shown_runs if r.id == run_id), None)

    def current_experiment(self) -> str | None:
        """The experiment of the highlighted row (a group row, or a run of an experiment)."""
        key = self.query_one(RunsTable).current_key
        name = group_name(key)
        if name is not None:
            return name
        run = self.current_run()
        return run.experiment if run is not None else None

    def fold(self, name: str) -> None:
        """Fold an experiment's runs under its group row, or unfold them; the cursor stays on the group."""
        self.collapsed ^= {name}
        self._render_runs()
        table = self.query_one(RunsTable)
        keys = [r.key if isinstance(r, Group) else r.id for r in self._rows]
        group = self._group(name)
        if group is not None and group.key in keys:
            table.move_cursor(row=keys.index(group.key), animate=False)

    def action_fold(self) -> None:
        name = self.current_experiment()
        if name is None:
            self.notify("this run belongs to no experiment (cherry sweep makes them)", severity="warning")
            return
        self.fold(name)

    def action_experiment(self) -> None:
        name = self.current_experiment()
        if name is None:
            self.notify("highlight an experiment's row (or one of its runs), then press e", severity="warning")
            return
        from tuiapp.screens.experiment import ExperimentScreen

        self.app.push_screen(ExperimentScreen(name))

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.focus()

    def action_back(self) -> None:
        box = self.query_one("#filter", Input)
        if box.has_focus:
            box.value = ""
            box.display = False
            self.query_one(RunsTable).focus()
        elif self.full:
            self.full = False
        elif self.filter_text or self.status_filter:
            box.value = ""
            box.display = False
            self.filter_text = ""
            self.status_filter = None
            self._render_runs()
        elif not self.query_one(RunsTable).has_focus:
            self.query_one(RunsTable).focus()

    def action_status_filter(self) -> None:
        i = STATUS_FILTERS.index(self.status_filter)
        self.status_filter = STATUS_FILTERS[(i + 1) % len(STATUS_FILTERS)]
        self._render_runs()

    def action_sort(self) -> None:
        self.sort_by = SORTS[(SORTS.index(self.sort_by) + 1) % len(SORTS)]
        self._render_runs()

    def action_new_run(self) -> None:
        self.app.action_new_run()

    def action_cancel_run(self) -> None:
        run = self.current_run()
        if run is None:
            self.notify("no run selected", severity="warning")
            return
        self.app.run_job_action("cancel", run.id)

    def action_resume_run(self) -> None:
        run = self.current_run()
        if run is None:
            self.notify("no run selected", severity="warning")
            return
        self.app.run_job_action("resume", run.id)

    def action_delete_run(self) -> None:
        run = self.current_run()
        if run is None:
            self.notify("no run selected", severity="warning")
            return
        from tuiapp.screens.confirm import ConfirmScreen

        def done(yes: bool | None) -> None:
            if yes:
                self.app.run_job_action("remove", run.id)

        self.app.push_screen(
            ConfirmScreen(
                f"Delete {run.id} ({run.status})?", f"Its metrics, samples and its directory {run.out_dir} are removed."
            ),
            done,
        )

    def action_toggle_select(self) -> None:
        run = self.current_run()
        if run is None:
            return
        if run.id in self.selected:
            self.selected.remove(run.id)
        else:
            self.selected.append(run.id)
        self._render_runs()

    def action_compare(self) -> None:
        ids = [r for r in self.selected if self._snapshot and any(x.id == r for x in self._snapshot.runs)]
        if not ids:
            run = self.current_run()
            if run is None:
                self.notify("select runs with space, then press v", severity="warning")
                return
            ids = [run.id]
        from tuiapp.screens.compare import CompareScreen

        self.app.push_screen(CompareScreen(ids))

    def action_pick_metrics(self) -> None:
        snap = self._snapshot
        if snap is None or snap.detail is None or not snap.detail.series:
            self.notify("the focused run has logged no metrics yet", severity="warning")
            return
        from tuiapp.screens.pickers import MetricPicker

        available = sorted(snap.detail.series)
        current = [m for m in (self.chosen_metrics or []) if m in available] or default_metrics(
            snap.detail.run.algorithm, available
        )

        def done(chosen: list[str] | None) -> None:
            if chosen is not None:
                self.chosen_metrics = chosen or None
                self._remounts = 0
                self._render_charts_again()

        self.app.push_screen(MetricPicker(available, current, multiple=True), done)

    def action_smoothing(self) -> None:
        i = SMOOTHING_STEPS.index(self.smoothing) if self.smoothing in SMOOTHING_STEPS else 0
        self.smoothing = SMOOTHING_STEPS[(i + 1) % len(SMOOTHING_STEPS)]

    def action_log_y(self) -> None:
        self.log_y = not self.log_y

    def action_x_axis(self) -> None:
        self.x_by_time = not self.x_by_time

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    def action_pairs_first(self) -> None:
        """Samples: the preference pairs (chosen vs rejected) above the reference vs policy rows, or below."""
        view = self.query_one(SamplesView)
        view.pairs_first = not view.pairs_first
        self.query_one(TabbedContent).active = "tab-samples"

    def action_label(self) -> None:
        """Label two completions at a time: the shown step's rollouts, or its eval samples (reference vs policy)."""
        if self._rollouts_active:
            self.query_one(RolloutsView).action_label()
            return
        snap = self._snapshot
        if snap is None or snap.detail is None or snap.detail.sample_step is None:
            self.notify("no samples to label: open a run's Samples (2) or Rollouts (5) tab", severity="warning")
            return
        from tuiapp.labels import sample_candidates
        from tuiapp.screens.label import LabelScreen

        detail = snap.detail
        candidates = sample_candidates(detail.run.id, detail.sample_step, detail.samples)
        self.app.push_screen(LabelScreen(candidates, detail.run, f"eval samples of step {detail.sample_step}"))

    def action_sample_step(self, delta: int) -> None:
        if self._rollouts_active:  # [ ] move through the tab that is shown
            self.query_one(RolloutsView).action_step(delta)
            return
        snap = self._snapshot
        if snap is None or snap.detail is None or not snap.detail.sample_steps:
            return
        steps = snap.detail.sample_steps
        step = move_step(steps, snap.detail.sample_step, delta)
        self.app.want.sample_step = None if step == steps[-1] else step
        snap.detail.sample_step = step
        snap.detail.samples = []
        self.query_one(TabbedContent).active = "tab-samples"
        self.app.wake_reader()
