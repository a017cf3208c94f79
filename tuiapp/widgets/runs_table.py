"""The runs list: status glyph and colour, id, algorithm, progress, key metric, age; sortable."""

from __future__ import annotations

import time

from rich.cells import cell_len
from rich.text import Text
from textual.widgets import DataTable

from tuiapp.data import GLYPHS, KEY_METRICS, RunInfo, age, duration
from tuiapp.widgets.plot import fmt_num

# Most telling first: what the pane cannot show scrolls off to the right (ETA is in the run's title too).
COLUMNS = (
    ("run", "run"),
    ("status", "status"),
    ("step", "step"),
    ("metric", "metric"),
    ("age", "age"),
    ("algo", "algo"),
    ("eta", "ETA"),
)
SHORT_METRIC = {
    "eval/exact_match": "EM",
    "eval/rewards/accuracy": "acc",
    "rewards/accuracy": "acc",
    "train/loss": "loss",
}
SORTS = ("created", "status", "algorithm", "metric")  # `o` cycles through these
# Live runs first, then the ones that need a look, then the finished ones.
STATUS_ORDER = {"running": 0, "queued": 1, "interrupted": 2, "failed": 3, "cancelled": 4, "pruned": 5, "completed": 6}
LOWER_IS_BETTER = ("train/loss",)


def sort_runs(runs: list[RunInfo], by: str) -> list[RunInfo]:
    """Runs in display order. created: newest first; status: live first; algorithm: A-Z;
    metric: best key metric first (runs compared within the same metric; none last). Ties: newest first."""
    order = sorted(enumerate(runs), key=lambda item: (item[1].created_at or 0.0, item[0]), reverse=True)
    newest = [run for _, run in order]  # sorted() is stable, so the sorts below keep newest first on ties
    if by == "status":
        return sorted(newest, key=lambda r: STATUS_ORDER.get(r.status, 9))
    if by == "algorithm":
        return sorted(newest, key=lambda r: r.algorithm)
    if by == "metric":

        def metric_key(r: RunInfo):
            if not r.key_metric:
                return (len(KEY_METRICS), 0.0)
            name, value = r.key_metric
            rank = KEY_METRICS.index(name) if name in KEY_METRICS else len(KEY_METRICS) - 1
            return (rank, value if name in LOWER_IS_BETTER else -value)

        return sorted(newest, key=metric_key)
    return newest


def status_text(run: RunInfo) -> Text:
    glyph, colour = GLYPHS.get(run.status, ("?", "white"))
    label = run.status
    if run.waiting:
        label = "waiting"
    elif run.status == "running" and run.cancel_requested:
        label = "stopping"
    return Text(label, style=colour)


def cells(run: RunInfo, selected: bool, now: float) -> tuple:
    progress = f"{run.step}/{run.total_steps}" if run.total_steps else (f"{run.step}/?" if run.step else "")
    metric = ""
    if run.key_metric:
        name, value = run.key_metric
        metric = f"{SHORT_METRIC.get(name, name.split('/')[-1][:6])} {fmt_num(value)}"
    eta = duration(run.eta_seconds(now)) if run.status == "running" else ""
    glyph, colour = GLYPHS.get(run.status, ("?", "white"))
    return (
        (Text("◆", style="bold yellow") if selected else Text(" "))
        + Text(f"{glyph} ", style=colour)
        + Text(run.name if len(run.name) <= 24 else run.name[:23] + "…"),
        status_text(run),
        Text(progress, justify="right"),
        metric,
        Text(age(run.created_at, now), justify="right"),
        run.algorithm,
        eta,
    )


def same_cell(old: object, new: object) -> bool:
    """Whether a cell would look the same (rich's Text equality ignores the style)."""
    if isinstance(old, Text) and isinstance(new, Text):
        return (old.plain, str(old.style), old.spans) == (new.plain, str(new.style), new.spans)
    return type(old) is type(new) and old == new


class RunsTable(DataTable):
    """Rows keyed by run id; `show()` updates cells in place so the cursor stays on its run."""

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = False
        self.cell_padding = 1
        self._ensure_columns()

    def _ensure_columns(self) -> None:
        if not self.columns:  # a snapshot can arrive before this widget's Mount
            for key, label in COLUMNS:
                self.add_column(label, key=key)

    @property
    def current_run_id(self) -> str | None:
        if not self.row_count:
            return None
        try:
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except Exception:
            return None

    def show(self, runs: list[RunInfo], selected: set[str], now: float | None = None) -> None:
        self._ensure_columns()
        now = time.time() if now is None else now
        current = self.current_run_id
        keys = [r.id for r in runs]
        existing = [k.value for k in self.rows]
        if keys == existing:
            # Only the cells that changed, and a column re-measured only when a value outgrows it: each
            # width update measures the whole column, so updating every cell each snapshot froze the
            # app for seconds with a few hundred runs (cherry bench queue).
            for run in runs:
                for (col, _), value in zip(COLUMNS, cells(run, run.id in selected, now)):
                    if not same_cell(self.get_cell(run.id, col), value):
                        wider = cell_len(str(value)) > self.columns[col].content_width
                        self.update_cell(run.id, col, value, update_width=wider)
            return
        self.clear()
        for run in runs:
            self.add_row(*cells(run, run.id in selected, now), key=run.id)
        if current in keys:
            self.move_cursor(row=keys.index(current), animate=False)
