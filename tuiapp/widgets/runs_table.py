"""The runs list: status glyph and colour, id, algorithm, progress, key metric, age; sortable. Runs of an
experiment sit under its group row (collapsible), best point first."""

from __future__ import annotations

import re
import time
from collections import Counter

from rich.cells import cell_len
from rich.text import Text
from textual.widgets import DataTable

from tuiapp.data import GLYPHS, KEY_METRICS, RunInfo, age, duration
from tuiapp.experiment import GROUP_KEY, Group
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


def metric_cell(name: str, value: float) -> str:
    return f"{SHORT_METRIC.get(name, name.split('/')[-1][:6])} {fmt_num(value)}"


def id_hint(run_id: str) -> str:
    """What tells two runs of one name apart: the time in their id (`20261207-194501-dpo-demo-2` -> `19:45:01 #2`)."""
    match = re.match(r"\d{8}-(\d\d)(\d\d)(\d\d)-.*?(?:-(\d+))?$", run_id)
    if not match:
        return run_id[-8:]
    hours, minutes, seconds, n = match.groups()
    return f"{hours}:{minutes}:{seconds}" + (f" #{n}" if n else "")


def run_label(run: RunInfo, grouped: bool, shared_name: bool = False) -> Text:
    """The run's name (under its group row: without the experiment's prefix), what tells it from runs of the
    same name (`shared_name`), and its tags."""
    name = run.name
    if grouped and run.experiment and name.startswith(run.experiment + "-"):
        name = name[len(run.experiment) + 1 :]
    text = Text(name if len(name) <= 24 else name[:23] + "…")
    if shared_name:
        text.append(f" {id_hint(run.id)}", style="dim")
    for tag in run.tags:
        text.append(f" #{tag}", style="dim cyan")
    return text


def cells(run: RunInfo, selected: bool, now: float, grouped: bool = False, shared_name: bool = False) -> tuple:
    progress = f"{run.step}/{run.total_steps}" if run.total_steps else (f"{run.step}/?" if run.step else "")
    metric = metric_cell(*run.key_metric) if run.key_metric else ""
    eta = duration(run.eta_seconds(now)) if run.status == "running" else ""
    glyph, colour = GLYPHS.get(run.status, ("?", "white"))
    return (
        (Text("◆", style="bold yellow") if selected else Text(" "))
        + Text(("  " if grouped else "") + f"{glyph} ", style=colour)
        + run_label(run, grouped, shared_name),
        status_text(run),
        Text(progress, justify="right"),
        Text(metric),  # Text, never a str: a str cell is parsed as markup
        Text(age(run.created_at, now), justify="right"),
        Text(run.algorithm),
        Text(eta),
    )


def group_cells(group: Group, now: float) -> tuple:
    """An experiment's row: fold mark, name and size, its runs' statuses, the best key metric."""
    status = Text()
    for name, count in sorted(group.counts().items(), key=lambda item: STATUS_ORDER.get(item[0], 9)):
        glyph, colour = GLYPHS.get(name, ("?", "white"))
        status.append(f"{count}{glyph} ", style=colour)
    best = group.best_value
    newest = max((r.created_at or 0.0 for r in group.runs), default=0.0)
    return (
        Text(f"{'▸' if group.collapsed else '▾'} {group.name} ({len(group.runs)})", style="bold"),
        status,
        Text(""),
        Text("best " + metric_cell(group.metric, best), style="bold")
        if best is not None and group.metric
        else Text(""),
        Text(age(newest, now), justify="right"),
        Text(group.runs[0].algorithm if group.runs else ""),
        Text(""),
    )


def same_cell(old: object, new: object) -> bool:
    """Whether a cell would look the same (rich's Text equality ignores the style)."""
    if isinstance(old, Text) and isinstance(new, Text):
        return (old.plain, str(old.style), old.spans) == (new.plain, str(new.style), new.spans)
    return type(old) is type(new) and old == new


class RunsTable(DataTable):
    """Rows keyed by run id (a group row by GROUP_KEY + experiment); `show()` updates cells in place so
    the cursor stays on its row."""

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
    def current_key(self) -> str | None:
        """The highlighted row's key: a run id, or GROUP_KEY + experiment on a group row."""
        if not self.row_count:
            return None
        try:
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except Exception:
            return None

    @property
    def current_run_id(self) -> str | None:
        key = self.current_key
        return None if key is None or key.startswith(GROUP_KEY) else key

    def show(self, rows: list[RunInfo | Group], selected: set[str], now: float | None = None) -> None:
        self._ensure_columns()
        now = time.time() if now is None else now
        current = self.current_key
        keys = [r.key if isinstance(r, Group) else r.id for r in rows]
        names = Counter(r.name for r in rows if not isinstance(r, Group))
        row_cells = [
            group_cells(r, now)
            if isinstance(r, Group)
            else cells(r, r.id in selected, now, bool(r.experiment), names[r.name] > 1)
            for r in rows
        ]
        existing = [k.value for k in self.rows]
        if keys == existing:
            # Only the cells that changed, and a column re-measured only when a value outgrows it: each
            # width update measures the whole column, so updating every cell each snapshot froze the
            # app for seconds with a few hundred runs (cherry bench queue).
            for key, values in zip(keys, row_cells):
                for (col, _), value in zip(COLUMNS, values):
                    if not same_cell(self.get_cell(key, col), value):
                        wider = cell_len(str(value)) > self.columns[col].content_width
                        self.update_cell(key, col, value, update_width=wider)
            return
        self.clear()
        for key, values in zip(keys, row_cells):
            self.add_row(*values, key=key)
        if current in keys:
            self.move_cursor(row=keys.index(current), animate=False)
