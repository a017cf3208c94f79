"""The Textual app with Pilot: runs table, filters, run view, samples, cancel / delete, new-run form,
compare, command palette; plus the pure plotting functions and a real-worker end-to-end run.

Display tests write the store directly (tests/app_fixtures.py): no worker, no torch, fast.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.home import store_path
from jobs.store import Store
from tests.app_fixtures import populate, screen_text
from tuiapp.widgets.plot import BRAILLE_BASE, Series, ema, plot, sparkline

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- pure functions


def test_ema_smooths_and_zero_is_identity():
    values = [1.0, 0.0, 1.0, 0.0]
    assert ema(values, 0.0) == values
    smooth = ema(values, 0.5)
    assert smooth[0] == pytest.approx(1.0)  # debiased: the first value is kept
    assert max(smooth[1:]) < 1.0 and min(smooth[1:]) > 0.0
    with pytest.raises(ValueError):
        ema(values, 1.0)


def test_plot_draws_a_rising_line_corner_to_corner():
    p = plot([Series([0, 1, 2, 3], [0.0, 1.0, 2.0, 3.0])], width=4, height=2)
    assert len(p.rows) == 2 and all(len(r) == 4 for r in p.rows)
    # a rising line: bottom-left and top-right cells are drawn, top-left and bottom-right are empty
    assert p.rows[1][0] != " " and p.rows[0][3] != " "
    assert p.rows[0][0] == " " and p.rows[1][3] == " "
    assert all(ch == " " or BRAILLE_BASE <= ord(ch) < BRAILLE_BASE + 256 for r in p.rows for ch in r)
    assert p.y_range == (0.0, 3.0) and p.x_range == (0, 3)


def test_plot_log_y_skips_non_positive_values_and_shares_axes():
    p = plot([Series([0, 1, 2], [0.0, 10.0, 100.0]), Series([0, 1], [1.0, 1000.0], points_only=True)], 10, 3, log_y=True)
    assert p.skipped == 1
    assert p.y_range == pytest.approx((1.0, 1000.0))
    owners = {o for row in p.owner for o in row}
    assert {0, 1} <= owners  # both series drew on the shared canvas


def test_plot_flat_and_empty_series_do_not_crash():
    assert plot([Series([1, 2], [5.0, 5.0])], 5, 2).y_range[0] < 5.0 < plot([Series([1, 2], [5.0, 5.0])], 5, 2).y_range[1]
    assert plot([Series([], [])], 5, 2).rows == [" " * 5] * 2
    assert sparkline([1, 2, 3, 4], 4) == "▁▃▅▇" or len(sparkline([1, 2, 3, 4], 4)) == 4
    assert sparkline([], 4) == ""


def test_importing_the_app_does_not_import_torch():
    code = "import tuiapp.app, tuiapp.screens.main, tuiapp.screens.new_run, tuiapp.screens.compare, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ----------------------------------------------------------------------------- Pilot helpers


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("CHERRY_HOME", str(path))
    return path


@pytest.fixture
def runs(home) -> dict[str, str]:
    return populate(home)


async def wait_until(pilot, predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await pilot.pause(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{screen_text(pilot.app)}")


def make_app(home: Path):
    from tuiapp.app import CherryApp

    return CherryApp(home, poll_live=0.1, poll_idle=0.2)


async def focus_run(pilot, run_id: str) -> None:
    from tuiapp.widgets.runs_table import RunsTable

    table = pilot.app.screen.query_one(RunsTable)
    await wait_until(pilot, lambda: table.row_count > 0, what="rows")
    keys = [k.value for k in table.rows]
    table.move_cursor(row=keys.index(run_id))
    await wait_until(pilot, lambda: pilot.app.snapshot and pilot.app.snapshot.detail
                     and pilot.app.snapshot.detail.run.id == run_id, what=f"detail of {run_id}")
    await pilot.pause(0.2)


def run_status(home: Path, run_id: str) -> str | None:
    store = Store(store_path(home))
    try:
        run = store.get_run(run_id)
        return run.status if run else None
    finally:
        store.close()


# ----------------------------------------------------------------------------- main screen


@pytest.mark.asyncio
@pytest.mark.parametrize("size", [(120, 40), (80, 24)])
async def test_table_lists_runs_with_status_and_header(home, runs, size):
    app = make_app(home)
    async with app.run_test(size=size) as pilot:
        await wait_until(pilot, lambda: app.reads >= 1, what="first read")
        await pilot.pause(0.2)
        text = screen_text(app)
        for name in ("dpo-beta01", "dpo-beta05", "kto-try", "orpo-next"):
            assert name in text
        assert "queue: sqlite" in text and "1 running" in text
        assert "✓" in text and "✗" in text and "●" in text and "○" in text
        assert "30/100" in text


@pytest.mark.asyncio
async def test_text_and_status_filters(home, runs):
    from tuiapp.widgets.runs_table import RunsTable

    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        table = app.screen.query_one(RunsTable)
        await wait_until(pilot, lambda: table.row_count == 4, what="4 rows")
        await pilot.press("slash", "k", "t", "o")
        await wait_until(pilot, lambda: table.row_count == 1, what="text filter")
        assert [k.value for k in table.rows] == [runs["failed"]]
        await pilot.press("enter", "escape")  # leave the box, then clear the filter
        await wait_until(pilot, lambda: table.row_count == 4, what="filter cleared")
        await pilot.press("f")  # live: queued + running
        await wait_until(pilot, lambda: table.row_count == 2, what="status filter")
        assert {k.value for k in table.rows} == {runs["running"], runs["queued"]}
        assert "status: live" in screen_text(app)


@pytest.mark.asyncio
@pytest.mark.parametrize("size", [(120, 40), (80, 24)])
async def test_run_view_shows_curves_and_latest_values(home, runs, size):
    app = make_app(home)
    async with app.run_test(size=size) as pilot:
        await focus_run(pilot, runs["done"])
        text = screen_text(app)
        assert "train/loss" in text and "0.09338" in text  # the last loss value
        assert "40/40" in text and "completed" in text
        assert any(0x2800 < ord(ch) <= 0x28FF for ch in text)  # braille curves drawn
        await pilot.press("s", "y")
        assert "smooth 0.6" in screen_text(app) and "log-y on" in screen_text(app)
        await pilot.press("4")  # spec and events
        await pilot.pause(0.1)
        assert "beta: 0.1" in screen_text(app)
        await pilot.press("3")  # log tail
        await wait_until(pilot, lambda: "final weights saved" in screen_text(app), what="log tail")


@pytest.mark.asyncio
async def test_metric_picker_filters_and_chooses_charts(home, runs):
    from tuiapp.screens.pickers import MetricPicker
    from tuiapp.widgets.chart import Chart

    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        await focus_run(pilot, runs["done"])
        await pilot.press("m")
        await wait_until(pilot, lambda: isinstance(app.screen, MetricPicker), what="picker")
        picker = app.screen
        # start from nothing chosen, then pick one metric by typing part of its name
        picker.chosen.clear()
        await pilot.press("m", "a", "r", "g")
        await pilot.pause(0.1)
        assert picker.query_one("#picker-list").option_count == 1
        await pilot.press("enter")
        await wait_until(pilot, lambda: not isinstance(app.screen, MetricPicker), what="picker closed")
        await wait_until(pilot, lambda: [c.title for c in app.screen.query(Chart)] == ["rewards/margin"], what="one chart")


@pytest.mark.asyncio
async def test_samples_pane_steps_through_logged_steps(home, runs):
    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        await focus_run(pilot, runs["done"])
        await pilot.press("2")
        await wait_until(pilot, lambda: "47+38=" in screen_text(app), what="samples")
        text = screen_text(app)
        assert "step 40" in text and "85 ✓" in text and "75 ✗" in text
        await pilot.press("left_square_bracket")
        await wait_until(pilot, lambda: "step 20" in screen_text(app), what="older step")
        assert "85 ✓" not in screen_text(app)
        await pilot.press("right_square_bracket")
        await wait_until(pilot, lambda: "step 40" in screen_text(app), what="newer step")


@pytest.mark.asyncio
async def test_cancel_a_queued_run(home, runs):
    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        await focus_run(pilot, runs["queued"])
        await pilot.press("c")
        await wait_until(pilot, lambda: run_status(home, runs["queued"]) == "cancelled", what="cancelled in the store")
        await wait_until(pilot, lambda: "cancelled" in screen_text(app), what="cancelled on screen")
        await pilot.press("c")  # again: refused with a toast, no traceback
        await pilot.pause(0.3)
        assert run_status(home, runs["queued"]) == "cancelled"


@pytest.mark.asyncio
async def test_delete_asks_first(home, runs):
    from tuiapp.screens.confirm import ConfirmScreen

    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        await focus_run(pilot, runs["failed"])
        await pilot.press("d")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        await pilot.press("n")
        await pilot.pause(0.2)
        assert run_status(home, runs["failed"]) == "failed"
        await pilot.press("d")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        await pilot.press("y")
        await wait_until(pilot, lambda: run_status(home, runs["failed"]) is None, what="run removed")
        await wait_until(pilot, lambda: "kto-try" not in screen_text(app), what="row gone")


@pytest.mark.asyncio
async def test_compare_overlays_selected_runs_and_frontier(home, runs):
    from tuiapp.screens.compare import CompareScreen
    from tuiapp.widgets.chart import Chart

    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        await focus_run(pilot, runs["done"])
        await pilot.press("space")
        await focus_run(pilot, runs["running"])
        await pilot.press("space", "v")
        await wait_until(pilot, lambda: isinstance(app.screen, CompareScreen) and app.screen.query(Chart), what="compare")
        chart = app.screen.query_one(Chart)
        await wait_until(pilot, lambda: len(chart.curves) == 2, what="two curves")
        assert chart.title == "train/loss"
        assert {c[0] for c in chart.curves} == {"dpo-beta01", "dpo-beta05"}
        assert len({c[3] for c in chart.curves}) == 2  # one colour per run
        await pilot.press("f")
        await wait_until(pilot, lambda: chart.scatter and len(chart.curves) == 2, what="frontier")
        assert "eval/exact_match vs kl/mean" in screen_text(app)
        await pilot.press("escape")
        assert not isinstance(app.screen, CompareScreen)
        assert app.want.compare == ()


@pytest.mark.asyncio
async def test_command_palette_reaches_the_actions(home, runs):
    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.reads >= 1, what="first read")
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert {"New run", "Cancel run", "Resume run", "Delete run", "Compare runs", "Filter runs", "Quit"} <= titles
        await pilot.press("ctrl+p")
        await pilot.pause(0.2)
        await pilot.press(*"new run")
        await pilot.pause(0.3)
        await pilot.press("enter")
        from tuiapp.screens.new_run import NewRunScreen

        await wait_until(pilot, lambda: isinstance(app.screen, NewRunScreen), what="new-run form from the palette")


# ----------------------------------------------------------------------------- new run


async def open_form(pilot):
    from tuiapp.screens.new_run import NewRunScreen

    await wait_until(pilot, lambda: pilot.app.reads >= 1, what="first read")
    await pilot.press("n")
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, NewRunScreen), what="form")
    await pilot.pause(0.2)
    return pilot.app.screen


@pytest.mark.asyncio
@pytest.mark.parametrize("size", [(120, 40), (80, 24)])
async def test_new_run_shows_errors_next_to_fields_and_submits(home, size):
    from textual.widgets import Input, Static

    app = make_app(home)
    async with app.run_test(size=size) as pilot:
        form = await open_form(pilot)
        assert form.preset == "demo/dpo"
        await wait_until(pilot, lambda: "2,000 rows" in str(form.query_one("#dataset-preview", Static).render()),
                         what="dataset preview")
        form.query_one("#f-lr", Input).value = "-1"
        await pilot.pause(0.1)
        msg = str(form.query_one("#msg-lr", Static).render())
        assert "lr must be > 0" in msg
        assert form.query_one("#row-lr").has_class("-invalid")
        await pilot.press("ctrl+s")
        await pilot.pause(0.2)
        assert isinstance(app.screen, type(form))  # refused: still on the form
        assert Store(store_path(home)).list_runs() == []

        form.query_one("#f-lr", Input).value = "2e-5"
        form.query_one("#f-max_steps", Input).value = "3"
        form.query_one("#f-name", Input).value = "from-form"
        await pilot.pause(0.1)
        assert not form.query_one("#row-lr").has_class("-invalid")
        command = str(form.query_one("#command", Static).render())
        assert "--set lr=2e-5" in command and "--set max_steps=3" in command and "--preset demo/dpo" in command
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: app.screen is not form, timeout=15, what="form closed")
        store = Store(store_path(home))
        (run,) = store.list_runs()
        assert run.status == "queued" and run.name == "from-form"
        assert run.spec["lr"] == 2e-5 and run.spec["max_steps"] == 3 and run.spec["algorithm"] == "dpo"
        store.close()
        await wait_until(pilot, lambda: "from-form" in screen_text(app), what="new run in the table")


@pytest.mark.asyncio
async def test_new_run_bad_dataset_and_unknown_key(home, tmp_path):
    from textual.widgets import Input, Static

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1", "reply": "2"}\n')
    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        form = await open_form(pilot)
        form.query_one("#f-dataset", Input).value = str(tmp_path / "missing.jsonl")
        await pilot.pause(0.1)
        assert "does not exist" in str(form.query_one("#msg-dataset", Static).render())
        form.query_one("#f-dataset", Input).value = str(bad)
        await wait_until(pilot, lambda: "no known dataset format" in str(form.query_one("#dataset-preview", Static).render()),
                         what="format problem in the preview")
        form.query_one("#f-dataset", Input).value = "demo/pairs.jsonl"
        form.query_one("#f-extra", Input).value = "betta=0.2"
        await pilot.pause(0.1)
        assert "did you mean 'beta'" in str(form.query_one("#msg-extra", Static).render())
        form.query_one("#f-extra", Input).value = ""
        form.query_one("#f-beta", Input).value = "abc"
        await pilot.pause(0.1)
        assert "beta must be a number" in str(form.query_one("#msg-beta", Static).render())
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen is not form, what="form cancelled")


# ----------------------------------------------------------------------------- end to end


@pytest.mark.asyncio
async def test_submit_from_the_form_and_watch_a_real_worker_complete_it(home, tiny_model_dir, tiny_pairs):
    """The whole loop: the form queues a run, `cherry worker` executes it, the table shows it complete."""
    from textual.widgets import Input, Select

    from tests.test_jobs import WorkerProcess

    worker = WorkerProcess(home)
    app = make_app(home)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            form = await open_form(pilot)
            form.query_one("#f-preset", Select).value = "dpo"
            await pilot.pause(0.2)
            values = {"model": str(tiny_model_dir), "dataset": str(tiny_pairs), "name": "e2e", "lr": "1e-3",
                      "batch_size": "4", "grad_accum": "1", "max_steps": "3", "eval_steps": "0", "sample_steps": "0",
                      "save_steps": "5", "num_threads": "1", "max_length": "64", "max_prompt_length": "32"}
            for key, value in values.items():
                form.query_one(f"#f-{key}", Input).value = value
            form.query_one("#f-extra", Input).value = "num_samples=0 kl_samples=0 max_new_tokens=4"
            await pilot.pause(0.2)
            assert form.validate(), form.errors
            await pilot.press("ctrl+s")
            await wait_until(pilot, lambda: app.screen is not form, timeout=15, what="submitted")
            await wait_until(
                pilot, lambda: app.snapshot and any(r.name == "e2e" and r.status == "completed" for r in app.snapshot.runs),
                timeout=120, what="the run to complete",
            )
            await focus_run(pilot, next(r.id for r in app.snapshot.runs if r.name == "e2e"))
            await wait_until(pilot, lambda: "train/loss" in screen_text(app), what="its loss curve")
            assert "3/3" in screen_text(app)
    finally:
        worker.stop()
