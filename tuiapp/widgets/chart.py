"""A line chart widget: braille curves with y labels, an x axis, EMA smoothing and log-Y."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from tuiapp.widgets.plot import Plot, Series, ema, fmt_num, plot

LABEL_W = 8
RUN_COLOURS = ("dodger_blue1", "orange1", "green3", "magenta", "gold1", "cyan", "red1", "medium_purple1")


def run_colour(index: int) -> str:
    """A stable colour per run: by its position in the selection, cycling."""
    return RUN_COLOURS[index % len(RUN_COLOURS)]


def render_plot(p: Plot, series: list[Series], title: Text, x_label: str) -> Text:
    """A plot with a title line, y labels on the left and an x axis under it."""
    out = Text()
    out.append_text(title)
    height = len(p.rows)
    y_lo, y_hi = p.y_range
    for r, row in enumerate(p.rows):
        out.append("\n")
        if r == 0:
            label = fmt_num(y_hi)
        elif r == height - 1:
            label = fmt_num(y_lo)
        elif r == height // 2 and height >= 5:
            label = fmt_num((y_lo * y_hi) ** 0.5 if p.log_y and y_lo > 0 else (y_lo + y_hi) / 2)
        else:
            label = ""
        out.append(f"{label:>{LABEL_W - 1}}", style="dim")
        out.append("│", style="dim")
        owner = p.owner[r]
        start = 0
        for c in range(1, len(row) + 1):
            if c == len(row) or owner[c] != owner[start]:
                style = series[owner[start]].style if owner[start] >= 0 else ""
                out.append(row[start:c], style=style)
                start = c
    x_lo, x_hi = p.x_range
    width = len(p.rows[0]) if p.rows else 0
    lo, hi = fmt_num(x_lo), fmt_num(x_hi)
    axis = lo + x_label.center(max(0, width - len(lo) - len(hi))) + hi
    out.append("\n" + " " * (LABEL_W - 1) + "└", style="dim")
    out.append(axis[:width], style="dim")
    return out


class Chart(Widget):
    """One metric (or one metric of several runs) as a braille line plot.

    `curves` holds (label, xs, ys, colour) tuples; `smoothing` (EMA) and `log_y` apply to all. In a
    scatter, the curves labelled in `lines` are still drawn as lines (a frontier through the points).
    """

    curves: reactive[list[tuple[str, list[float], list[float], str]]] = reactive(list, always_update=True)
    title: reactive[str] = reactive("")
    smoothing: reactive[float] = reactive(0.0)
    log_y: reactive[bool] = reactive(False)
    x_label: reactive[str] = reactive("step")
    scatter: reactive[bool] = reactive(False)
    lines: reactive[tuple[str, ...]] = reactive(tuple)
    title_values: reactive[bool] = reactive(True)  # each curve's last value after the title

    def render(self) -> Text:
        width = max(4, self.size.width - LABEL_W)
        height = max(2, self.size.height - 2)
        series: list[Series] = []
        for label, xs, ys, colour in self.curves:
            if self.smoothing > 0 and not self.scatter and len(ys) > 1:
                series.append(Series(list(xs), list(ys), "", f"{colour} dim"))
                series.append(Series(list(xs), ema(ys, self.smoothing), label, colour))
            else:
                points_only = self.scatter and label not in self.lines
                series.append(Series(list(xs), list(ys), label, colour, points_only=points_only))
        title = Text(self.title, style="bold")
        for label, xs, ys, colour in self.curves if self.title_values else ():
            if ys:
                shown = f"{label} " if len(self.curves) > 1 else "  last "
                title.append(f"  {shown}", style=colour if len(self.curves) > 1 else "dim")
                title.append(fmt_num(ys[-1]))
        if not any(ys for _, _, ys, _ in self.curves):
            return Text.assemble(title, ("\n  no values logged yet", "dim"))
        p = plot(series, width, height, log_y=self.log_y)
        if self.log_y and p.skipped:
            title.append(f"  ({p.skipped} values <= 0 not shown)", style="dim")
        return render_plot(p, series, title, self.x_label)
