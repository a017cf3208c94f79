"""Snapshot tests of the app's main screens at 120x40 and 80x24 (pytest-textual-snapshot).

The store is the fixture store of tests/app/app_fixtures.py, whose timestamps are fixed; the app gets
the same fixed clock and a fixed home label, so ages, ETAs and paths are the same on every run.
Update the SVGs under tests/app/__snapshots__/ with `pytest tests/app/test_app_snapshots.py --snapshot-update`
after a deliberate change to the screens, and look at them before committing.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.app.app_fixtures import NOW, populate, screen_text

SIZES = [pytest.param((120, 40), id="120x40"), pytest.param((80, 24), id="80x24")]


@pytest.fixture
def runs(home) -> dict[str, str]:
    return populate(home)


def make_app(home: Path, focus: str | None = None):
    from tuiapp.app import CherryApp

    return CherryApp(home, poll_live=0.1, poll_idle=0.2, focus=focus, now=lambda: NOW, home_label="~/runs")


async def settle(pilot, predicate, what: str, timeout: float = 10.0) -> None:
    """Wait for `predicate`, then for two more store reads and a refresh, so the screen is final."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{screen_text(pilot.app)}")
        await pilot.pause(0.05)
    reads = pilot.app.reads
    while pilot.app.reads < reads + 2 and time.monotonic() < deadline:
        await pilot.pause(0.05)
    await pilot.pause(0.2)
    # A DataTable measures its columns on an idle message; on a loaded machine the picture could be
    # taken before that, with every column at its label's width (seen in CI).
    while any(table_pending(t) for t in pilot.app.screen.query("DataTable")) and time.monotonic() < deadline:
        await pilot.pause(0.05)
    for box in pilot.app.screen.query("Input"):
        box.cursor_blink = False  # a blinking cursor would make the picture depend on timing
    await pilot.pause()


def table_pending(table) -> bool:
    """Whether a DataTable still has rows or cells to measure (textual keeps that state private)."""
    return bool(
        getattr(table, "_require_update_dimensions", False)
        or getattr(table, "_new_rows", None)
        or getattr(table, "_updated_cells", None)
    )


def detail_of(app, run_id: str) -> bool:
    from tuiapp.widgets.chart import Chart

    snap = app.snapshot
    return bool(
        snap
        and snap.detail
        and snap.detail.run.id == run_id
        and all(c.curves for c in app.screen.query(Chart))
        and app.screen.query(Chart)
    )


@pytest.mark.parametrize("size", SIZES)
def test_main_screen(snap_compare, home, runs, size):
    """Runs table (newest first) with the running run focused: its live curves and ETA."""
    app = make_app(home, focus=runs["running"])

    async def run_before(pilot):
        await settle(pilot, lambda: detail_of(pilot.app, runs["running"]), "the running run's curves")

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_run_view(snap_compare, home, runs, size):
    """A completed run opened full screen (enter): curves, latest values, system figures."""
    app = make_app(home, focus=runs["done"])

    async def run_before(pilot):
        await settle(pilot, lambda: detail_of(pilot.app, runs["done"]), "the completed run's curves")
        await pilot.press("enter")
        await settle(
            pilot,
            lambda: not pilot.app.screen.query_one("#runs-pane").display and detail_of(pilot.app, runs["done"]),
            "the full-screen run view",
        )

    assert snap_compare(app, terminal_size=size, run_before=run_before)


def test_samples_pane(snap_compare, home, runs):
    """Reference vs policy at the last logged step, the changed characters highlighted."""
    app = make_app(home, focus=runs["done"])

    async def run_before(pilot):
        await settle(pilot, lambda: detail_of(pilot.app, runs["done"]), "the completed run")
        await pilot.press("2")
        await settle(pilot, lambda: "47+38=" in screen_text(pilot.app), "samples")

    assert snap_compare(app, terminal_size=(120, 40), run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_new_run_form(snap_compare, home, runs, size):
    """The form with the demo DPO preset's defaults, the dataset preview and the command line."""
    app = make_app(home, focus=runs["done"])

    async def run_before(pilot):
        from tuiapp.screens.new_run import NewRunScreen

        await settle(pilot, lambda: pilot.app.reads >= 1, "the first read")
        await pilot.press("n")
        await settle(
            pilot,
            lambda: (
                isinstance(pilot.app.screen, NewRunScreen)
                and "2,000 rows" in str(pilot.app.screen.query_one("#dataset-preview").render())
            ),
            "the form",
        )

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_compare_screen(snap_compare, home, runs, size):
    """Two runs selected (space) and compared (v): train/loss overlaid in their own colours."""
    app = make_app(home, focus=runs["done"])

    async def run_before(pilot):
        from tuiapp.screens.compare import CompareScreen
        from tuiapp.widgets.chart import Chart

        await settle(pilot, lambda: detail_of(pilot.app, runs["done"]), "the completed run")
        await pilot.press("space", "up")  # done is the oldest (last row); the running run is above it
        await settle(pilot, lambda: detail_of(pilot.app, runs["running"]), "the running run")
        await pilot.press("space", "v")
        await settle(
            pilot,
            lambda: isinstance(pilot.app.screen, CompareScreen) and len(pilot.app.screen.query_one(Chart).curves) == 2,
            "two curves",
        )

    assert snap_compare(app, terminal_size=size, run_before=run_before)


def test_preference_samples_pane(snap_compare, home, runs):
    """A preference run's samples: reference vs policy, then chosen vs rejected with rewards and margin."""
    from tests.app.app_fixtures import add_compare_samples

    add_compare_samples(home, runs)
    app = make_app(home, focus=runs["done"])

    async def run_before(pilot):
        await settle(pilot, lambda: detail_of(pilot.app, runs["done"]), "the completed run")
        await pilot.press("enter", "2")
        await settle(pilot, lambda: "chosen vs rejected on 3" in screen_text(pilot.app), "the pairs")

    assert snap_compare(app, terminal_size=(120, 40), run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_compare_samples(snap_compare, home, runs, size):
    """Two runs' policies on the same prompts (compare, then 2): where they differ highlighted."""
    from tests.app.app_fixtures import add_compare_samples

    add_compare_samples(home, runs)
    app = make_app(home, focus=runs["done"])

    async def run_before(pilot):
        from tuiapp.screens.compare import CompareScreen

        await settle(pilot, lambda: detail_of(pilot.app, runs["done"]), "the completed run")
        await pilot.press("space", "up")
        await settle(pilot, lambda: detail_of(pilot.app, runs["running"]), "the running run")
        await pilot.press("space", "v")
        await settle(pilot, lambda: isinstance(pilot.app.screen, CompareScreen), "compare")
        await pilot.press("2")
        await settle(pilot, lambda: "2 shared prompts" in screen_text(pilot.app), "samples side by side")

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_experiment_view(snap_compare, home, runs, size):
    """A 6-point sweep opened from its group row (e): curves coloured by lr with the legend, the runs
    ranked by their best exact match with the Pareto runs starred, the settings that differ; the
    reward-vs-KL frontier beside the curves at 120x40."""
    from tests.app.app_fixtures import add_experiment

    add_experiment(home)
    app = make_app(home)

    async def run_before(pilot):
        from tuiapp.screens.experiment import ExperimentScreen
        from tuiapp.widgets.runs_table import RunsTable

        await settle(pilot, lambda: pilot.app.reads >= 1, "the first read")
        table = pilot.app.screen.query_one(RunsTable)
        await settle(pilot, lambda: "experiment:lr-beta" in [k.value for k in table.rows], "the group row")
        table.move_cursor(row=[k.value for k in table.rows].index("experiment:lr-beta"))
        await pilot.press("e")
        await settle(
            pilot,
            lambda: (
                isinstance(pilot.app.screen, ExperimentScreen)
                and len(pilot.app.screen.query_one("#exp-curves").curves) == 6
            ),
            "six curves",
        )

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_runs_grouped_by_experiment(snap_compare, home, runs, size):
    """The runs table with a sweep's group row, its runs best first (the best one tagged #good)."""
    from tests.app.app_fixtures import add_experiment

    add_experiment(home)
    app = make_app(home, focus="experiment:lr-beta")

    async def run_before(pilot):
        await settle(pilot, lambda: pilot.app.reads >= 1, "the first read")
        await settle(pilot, lambda: pilot.app.screen.query_one("#runs").row_count == 11, "the runs")
        await settle(pilot, lambda: detail_of(pilot.app, pilot.app.screen._rows[1].best.id), "the best run")

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_rollouts_tab(snap_compare, home, runs, size):
    """A GRPO run's newest stored step full screen (enter, 5): each prompt's 4 completions side by side at
    120x40 (stacked at 80x24) with reward, advantage, length and reward components; the all-solved group
    flagged as zero variance."""
    from tests.app.app_fixtures import add_online_run

    run_id = add_online_run(home)
    app = make_app(home, focus=run_id)

    async def run_before(pilot):
        await settle(pilot, lambda: detail_of(pilot.app, run_id), "the GRPO run")
        await pilot.press("enter", "5")
        await settle(pilot, lambda: "step 3 (3/3," in screen_text(pilot.app), "the newest stored step")

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_label_screen(snap_compare, home, runs, size):
    """Labelling step 1's rollouts (L): the first pair of completions side by side, what differs highlighted,
    the label file named with its count so far."""
    from tests.app.app_fixtures import add_online_run

    run_id = add_online_run(home)
    app = make_app(home, focus=run_id)

    async def run_before(pilot):
        await settle(pilot, lambda: detail_of(pilot.app, run_id), "the GRPO run")
        await pilot.press("5")
        await settle(pilot, lambda: "step 3 (3/3," in screen_text(pilot.app), "the rollouts")
        await pilot.press("left", "left")
        await settle(pilot, lambda: "step 1 (1/3," in screen_text(pilot.app), "step 1")
        await pilot.press("L")
        await settle(pilot, lambda: "0 pairs, 0 ties so far" in screen_text(pilot.app), "the labelling screen")

    assert snap_compare(app, terminal_size=size, run_before=run_before)
