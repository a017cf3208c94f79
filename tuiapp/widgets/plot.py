"""Pure text plotting: series -> rows of braille characters (2 x 4 dots per terminal cell).

No Textual here, so every function is unit-testable on plain lists. `Chart` (tuiapp.widgets.chart)
turns the rows into styled text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

BRAILLE_BASE = 0x2800
# Dot bit for (column 0..1, row 0..3) inside one braille cell.
_DOT = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))
SPARK = "▁▂▃▄▅▆▇█"


def ema(values: Sequence[float], smoothing: float) -> list[float]:
    """Exponential moving average with debiasing (TensorBoard-style); smoothing 0 = raw values."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if smoothing == 0:
        return list(values)
    out, acc, weight = [], 0.0, 0.0
    for v in values:
        if not math.isfinite(v):
            out.append(out[-1] if out else v)
            continue
        acc = smoothing * acc + (1 - smoothing) * v
        weight = smoothing * weight + (1 - smoothing)
        out.append(acc / weight)
    return out


def sparkline(values: Sequence[float], width: int) -> str:
    """The last `width` values as block characters scaled to their own min..max."""
    vals = [v for v in values if math.isfinite(v)][-width:] if width > 0 else []
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = hi - lo
    return "".join(SPARK[0 if span == 0 else min(len(SPARK) - 1, int((v - lo) / span * len(SPARK)))] for v in vals)


@dataclass
class Series:
    xs: list[float]
    ys: list[float]
    label: str = ""
    style: str = ""
    points_only: bool = False  # scatter: mark the points, no connecting lines


@dataclass
class Plot:
    """A rendered plot: `rows[r][c]` is a braille char; `owner[r][c]` the series index drawn there (-1 none)."""

    rows: list[str]
    owner: list[list[int]]
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    log_y: bool = False
    skipped: int = 0  # points left out (non-finite, or <= 0 on a log axis)
    legend: list[tuple[str, str]] = field(default_factory=list)


def nice_range(lo: float, hi: float) -> tuple[float, float]:
    """A non-empty range around lo..hi (a flat series gets some room)."""
    if lo == hi:
        pad = abs(lo) * 0.05 or 1.0
        return lo - pad, hi + pad
    return lo, hi


def _line(x0: int, y0: int, x1: int, y1: int):
    """Dots of a straight segment (Bresenham)."""
    dx, dy = abs(x1 - x0), -abs(y1 - y0)
    sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
    err = dx + dy
    while True:
        yield x0, y0
        if x0 == x1 and y0 == y1:
            return
        e2 = 2 * err
        if e2 >= dy:
            err += dy
            x0 += sx
        if e2 <= dx:
            err += dx
            y0 += sy


def plot(
    series: Sequence[Series],
    width: int,
    height: int,
    *,
    log_y: bool = False,
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
) -> Plot:
    """Draw `series` on a `width` x `height` cell canvas (each cell 2 x 4 dots), shared axes."""
    width, height = max(1, width), max(1, height)
    skipped = 0
    clean: list[list[tuple[float, float]]] = []
    for s in series:
        pts = []
        for x, y in zip(s.xs, s.ys):
            if not (math.isfinite(x) and math.isfinite(y)) or (log_y and y <= 0):
                skipped += 1
                continue
            pts.append((x, math.log10(y) if log_y else y))
        clean.append(pts)
    every = [p for pts in clean for p in pts]
    if x_range is None:
        x_range = nice_range(min(p[0] for p in every), max(p[0] for p in every)) if every else (0.0, 1.0)
    if y_range is None:
        y_range = nice_range(min(p[1] for p in every), max(p[1] for p in every)) if every else (0.0, 1.0)
    elif log_y:
        y_range = (math.log10(y_range[0]), math.log10(y_range[1]))
    dots_w, dots_h = width * 2, height * 4
    bits = [[0] * width for _ in range(height)]
    owner = [[-1] * width for _ in range(height)]
    (x_lo, x_hi), (y_lo, y_hi) = x_range, y_range

    def to_dot(x: float, y: float) -> tuple[int, int]:
        dx = round((x - x_lo) / (x_hi - x_lo) * (dots_w - 1)) if x_hi > x_lo else 0
        dy = round((y - y_lo) / (y_hi - y_lo) * (dots_h - 1)) if y_hi > y_lo else 0
        return min(max(dx, 0), dots_w - 1), dots_h - 1 - min(max(dy, 0), dots_h - 1)

    for index, pts in enumerate(clean):
        dots = [to_dot(x, y) for x, y in pts]
        if series[index].points_only or len(dots) == 1:
            path = dots
        else:
            path = [d for a, b in zip(dots, dots[1:]) for d in _line(*a, *b)]
        for dx, dy in path:
            r, c = dy // 4, dx // 2
            # a scatter's point fills its whole cell: one dot of 2 x 4 is too small to see
            bits[r][c] |= 0xFF if series[index].points_only else _DOT[dx % 2][dy % 4]
            owner[r][c] = index
    rows = ["".join(chr(BRAILLE_BASE + b) if b else " " for b in row) for row in bits]
    legend = [(s.label, s.style) for s in series if s.label]
    return Plot(rows, owner, tuple(x_range), (10**y_lo, 10**y_hi) if log_y else (y_lo, y_hi), log_y, skipped, legend)


def fmt_num(value: float) -> str:
    """A short number for axis labels and tables: 0.693, 1.2e-05, 12.3k."""
    if value is None or not math.isfinite(value):
        return "-"
    a = abs(value)
    if a == 0:
        return "0"
    if a >= 1e5:
        return f"{value / 1e3:.0f}k" if a < 1e6 else f"{value:.2e}"
    if a >= 1000:
        return f"{value / 1e3:.1f}k"
    if a >= 1e-3:
        return f"{value:.4g}"
    return f"{value:.1e}"
