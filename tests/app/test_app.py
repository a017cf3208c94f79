"""The Textual app with Pilot: runs table, filters, run view, samples, cancel / delete, new-run form,
compare, command palette; plus the pure plotting functions and a real-worker end-to-end run.

Display tests write the store directly (tests/app/app_fixtures.py): no worker, no torch, fast.
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
from tests.app.app_fixtures import NOW, populate, screen_text
from tuiapp.widgets.plot import BRAILLE_BASE, Series, ema, plot, sparkline

ROOT = Path(__file__).resolve().parents[2]


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
    p = plot(
        [Series([0, 1, 2], [0.0, 10.0, 100.0]), Series([0, 1], [1.0, 1000.0], points_only=True)], 10, 3, log_y=True
    )
    assert p.skipped == 1
    assert p.y_range == pytest.approx((1.0, 1000.0))
    owners = {o for row in p.owner for o in row}
    assert {0, 1} <= owners  # both series drew on the shared canvas


def test_plot_flat_and_empty_series_do_not_crash():
    assert (
        plot([Series([1, 2], [5.0, 5.0])], 5, 2).y_range[0] < 5.0 < plot([Series([1, 2], [5.0, 5.0])], 5, 2).y_range[1]
    )
    assert plot([Series([], [])], 5, 2).rows == [" " * 5] * 2
    assert sparkline([1, 2, 3, 4], 4) == "▁▃▅▇" or len(sparkline([1, 2, 3, 4], 4)) == 4
    assert sparkline([], 4) == ""


def test_importing_the_app_does_not_import_torch():
    code = (
        "import tuiapp.app, tuiapp.screens.main, tuiapp.screens.new_run, tuiapp.screens.compare, sys, "
        "tuiapp.screens.experiment, tuiapp.screens.label, tuiapp.screens.rollout_compare; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_char_diff_marks_only_the_changed_characters():
    from tuiapp.widgets.samples import ADDED, REMOVED, char_diff

    ref, pol = char_diff("75", "85")
    assert ref.plain == "75" and pol.plain == "85"
    assert [(s.start, s.end, s.style) for s in ref.spans] == [(0, 1, REMOVED)]
    assert [(s.start, s.end, s.style) for s in pol.spans] == [(0, 1, ADDED)]
    ref, pol = char_diff("nedrag", "nedrag!")
    assert not ref.spans and [(s.start, s.end) for s in pol.spans] == [(6, 7)]


def test_samples_show_changed_rows_first_and_prompts_without_template_markers():
    from rich.console import Console

    from tuiapp.widgets.samples import plain_prompt, samples_table

    assert plain_prompt("<|user|>reverse: mlc<|end|><|assistant|>") == "reverse: mlc"
    assert plain_prompt("2+2=") == "2+2="
    console = Console(width=100, record=True)
    console.print(
        samples_table(
            [
                {"prompt": "<|user|>1+1=<|end|>", "reference": "2", "policy": "2"},
                {"prompt": "<|user|>2+2=<|end|>", "reference": "5", "policy": "4"},
            ]
        )
    )
    lines = [line for line in console.export_text().splitlines() if "=" in line]
    assert lines[0].split()[0] == "2+2=" and lines[1].split()[0] == "1+1=" and "<|" not in "".join(lines)


def test_sort_runs_by_each_key():
    from tuiapp.data import RunInfo
    from tuiapp.widgets.runs_table import SORTS, sort_runs

    def run(name, status, algo, created, metric=None):
        return RunInfo(
            id=name,
            name=name,
            status=status,
            algorithm=algo,
            model="m",
            dataset="d",
            step=0,
            total_steps=0,
            created_at=created,
            started_at=None,
            finished_at=None,
            parent=None,
            waiting=False,
            cancel_requested=False,
            error=None,
            out_dir="",
            spec={},
            key_metric=metric,
        )

    runs = [
        run("a", "completed", "sft", 1, ("eval/exact_match", 0.6)),
        run("b", "running", "dpo", 2, ("eval/exact_match", 0.7)),
        run("c", "failed", "kto", 3, ("train/loss", 0.2)),
        run("d", "queued", "dpo", 4),
        run("e", "completed", "orpo", 5, ("train/loss", 0.1)),
    ]
    order = {key: [r.id for r in sort_runs(runs, key)] for key in SORTS}
    assert order["created"] == ["e", "d", "c", "b", "a"]
    assert order["status"] == ["b", "d", "c", "e", "a"]
    assert order["algorithm"] == ["d", "b", "c", "e", "a"]
    assert order["metric"] == ["b", "a", "e", "c", "d"]  # exact match high first, then loss low first, none last


def test_proc_figures_of_a_local_running_run(home):
    """RSS and threads from /proc; CPU once there are two reads to compare."""
    import os

    from jobs.store import this_host
    from tuiapp.data import StoreReader, Want, read_proc

    if read_proc(os.getpid()) is None:
        pytest.skip("no /proc here")
    store = Store(store_path(home))
    store.create_run("r1", {"algorithm": "dpo"}, name="r1", out_dir=str(home / "r1"))
    store.set_status("r1", "running", pid=os.getpid(), worker_host=this_host())
    store.close()
    reader = StoreReader(home)
    try:
        first = reader.read(Want(focus="r1")).detail.proc
        assert first.pid == os.getpid() and first.rss_gb > 0.001 and first.threads >= 1 and first.cpu_pct is None
        sum(i * i for i in range(300_000))  # burn a little CPU between the reads
        time.sleep(0.1)
        second = reader.read(Want(focus="r1")).detail.proc
        assert second.cpu_pct is not None and second.cpu_pct >= 0
    finally:
        reader.close()


def test_user_preset_round_trip(tmp_path):
    """A saved preset loads back (engine.spec.load_preset takes the path) to the same spec, minus the name."""
    import yaml

    from engine.spec import resolve_spec
    from tuiapp.user_presets import list_user_presets, save_preset, target_path

    spec = resolve_spec("demo/dpo", ["lr=2e-5", "lora.r=8", "name=mine"], check_paths=False)
    path = save_preset(spec, target_path("my-dpo", tmp_path), "demo/dpo")
    assert path == tmp_path / "presets" / "my-dpo.yaml"
    values = yaml.safe_load(path.read_text())
    assert values["lr"] == 2e-5 and values["lora"] == {"r": 8} and "name" not in values
    again = resolve_spec(str(path), check_paths=False)
    assert again.to_dict() == {**spec.to_dict(), "name": None}
    assert [p for _, p in list_user_presets(tmp_path)] == [path]
    assert target_path("~/x/p.yaml", tmp_path).name == "p.yaml"
    with pytest.raises(Exception, match="letters, digits"):
        target_path("bad name!", tmp_path)


# ----------------------------------------------------------------------------- Pilot helpers


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

    return CherryApp(home, poll_live=0.1, poll_idle=0.2, now=lambda: NOW)


async def focus_run(pilot, run_id: str) -> None:
    from tuiapp.widgets.runs_table import RunsTable

    table = pilot.app.screen.query_one(RunsTable)
    await wait_until(pilot, lambda: table.row_count > 0, what="rows")
    keys = [k.value for k in table.rows]
    table.move_cursor(row=keys.index(run_id))
    await wait_until(
        pilot,
        lambda: pilot.app.snapshot and pilot.app.snapshot.detail and pilot.app.snapshot.detail.run.id == run_id,
        what=f"detail of {run_id}",
    )
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
async def test_sort_key_cycles_the_order_and_header_click_sorts(home, runs):
    from textual.widgets import DataTable

    from tuiapp.widgets.runs_table import RunsTable

    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        table = app.screen.query_one(RunsTable)
        await wait_until(pilot, lambda: table.row_count == 4, what="4 rows")
        order = lambda: [k.value for k in table.rows]  # noqa: E731
        assert order() == [runs["queued"], runs["failed"], runs["running"], runs["done"]]  # newest first
        await pilot.press("o")  # status: live first, finished last
        await wait_until(
            pilot, lambda: order() == [runs["running"], runs["queued"], runs["failed"], runs["done"]], what="by status"
        )
        assert "sort: status" in screen_text(app)
        await pilot.press("o")  # algorithm
        await wait_until(
            pilot,
            lambda: order() == [runs["running"], runs["done"], runs["failed"], runs["queued"]],
            what="by algorithm",
        )
        await pilot.press("o")  # key metric: exact match, best first; runs without one last
        await wait_until(pilot, lambda: order()[:2] == [runs["done"], runs["running"]], what="by metric")
        await pilot.press("o")
        await wait_until(
            pilot, lambda: order()[0] == runs["queued"] and "sort:" not in screen_text(app), what="back to created"
        )
        table.post_message(
            DataTable.HeaderSelected(table, table.columns["status"].key, 1, table.columns["status"].label)
        )
        await wait_until(pilot, lambda: app.screen.sort_by == "status", what="header click")


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
        await wait_until(pilot, lambda: "0.09338" in screen_text(app), what="the last loss value")
        text = screen_text(app)
        assert "train/loss" in text and "40/40" in text and "completed" in text
        await wait_until(
            pilot, lambda: any(0x2800 < ord(ch) <= 0x28FF for ch in screen_text(app)), what="braille curves"
        )
        await pilot.press("s", "y")
        await wait_until(
            pilot, lambda: "smooth 0.6" in screen_text(app) and "log-y on" in screen_text(app), what="toggles"
        )
        await pilot.press("4")  # spec and events
        await wait_until(pilot, lambda: "beta: 0.1" in screen_text(app), what="the spec tab")
        await pilot.press("3")  # log tail
        await wait_until(pilot, lambda: "final weights saved" in screen_text(app), what="log tail")


@pytest.mark.asyncio
async def test_run_view_shows_system_figures_and_opens_on_a_given_run(home, runs):
    from tuiapp.app import CherryApp
    from tuiapp.widgets.runs_table import RunsTable

    app = CherryApp(home, poll_live=0.1, poll_idle=0.2, now=lambda: NOW, focus=runs["done"], home_label="~/runs")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(
            pilot,
            lambda: app.snapshot and app.snapshot.detail and app.snapshot.detail.run.id == runs["done"],
            what="the given run focused",
        )
        assert app.screen.query_one(RunsTable).current_run_id == runs["done"]
        await wait_until(pilot, lambda: "rss 0.44 GB" in screen_text(app), what="system figures")
        assert "(last logged)" in screen_text(app) and "took 3m20s" in screen_text(app)
        await pilot.press("up")  # the focus was a start, not a lock
        await wait_until(pilot, lambda: app.want.focus == runs["running"], what="cursor moves on")
        await wait_until(pilot, lambda: "ETA 23m20s" in screen_text(app), what="ETA by the injected clock")
        assert "home: ~/runs" not in screen_text(app)  # 80 columns: the home gives way to the worker hint and queue
        assert "(run cherry worker)" in screen_text(app) and "queue: sqlite" in screen_text(app)


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
        await wait_until(
            pilot, lambda: [c.title for c in app.screen.query(Chart)] == ["rewards/margin"], what="one chart"
        )


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
async def test_samples_pane_shows_chosen_vs_rejected_with_rewards(home, runs):
    """Preference rows: chosen | rejected with the method's reward of each and the margin, step by step."""
    from tests.app.app_fixtures import add_compare_samples
    from tuiapp.widgets.samples import SamplesView

    add_compare_samples(home, runs)
    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        await focus_run(pilot, runs["done"])
        await pilot.press("enter", "2")  # full screen, samples tab
        await wait_until(pilot, lambda: "chosen vs rejected on 3 held-out pairs" in screen_text(app), what="the pairs")
        text = screen_text(app)
        assert "chosen ahead 2/3" in text and "mean margin +0.667" in text
        assert "+0.8 ✓" in text and "-0.3 ✗" in text and "+1.5 ✓" in text
        assert "21 +0.4" in text and "12 -0.4" in text  # each side's reward beside its text
        lines = text.splitlines()
        row = lambda needle: next(i for i, line in enumerate(lines) if needle in line)  # noqa: E731
        assert row("47+38=") < row("chosen vs rejected")  # reference vs policy first
        await pilot.press("p")
        await wait_until(pilot, lambda: app.screen.query_one(SamplesView).pairs_first, what="pairs first")
        await pilot.pause(0.1)
        lines = screen_text(app).splitlines()
        assert row("chosen vs rejected") < row("47+38=")
        await pilot.press("left_square_bracket")  # step 20: reference vs policy only
        await wait_until(pilot, lambda: "step 20" in screen_text(app), what="older step")
        assert "chosen vs rejected" not in screen_text(app)


@pytest.mark.asyncio
@pytest.mark.parametrize("size", [(120, 40), (80, 24)])
async def test_compare_samples_of_two_runs_side_by_side(home, runs, size):
    from tests.app.app_fixtures import add_compare_samples
    from tuiapp.screens.compare import CompareScreen

    add_compare_samples(home, runs)
    app = make_app(home)
    async with app.run_test(size=size) as pilot:
        await focus_run(pilot, runs["done"])
        await pilot.press("space")
        await focus_run(pilot, runs["running"])
        await pilot.press("space", "v")
        await wait_until(pilot, lambda: isinstance(app.screen, CompareScreen), what="compare")
        screen = app.screen
        assert "Samples side by side" in {c.title for c in app.get_system_commands(screen)}  # also in the palette
        await pilot.press("2")
        await wait_until(pilot, lambda: "2 shared prompts" in screen_text(app), what="side-by-side samples")
        assert (screen.run_a, screen.run_b) == (runs["done"], runs["running"])
        text = screen_text(app)
        assert "A ■ dpo-beta01  step 40" in text and "B ■ dpo-beta05  step 30" in text
        assert "1 differ" in text and "+1 only in B" in text and "only in A" not in text
        assert "85 ✓" in text and "95 ✗" in text  # A's and B's policy on 47+38=, each with its verifier mark
        assert "3 held-out pairs in both: chosen ahead in A 2/3, in B 2/3" in text
        assert not screen.query_one("#compare-chart").display

        await pilot.press("left_curly_bracket")  # B one logged step back
        await wait_until(pilot, lambda: "B ■ dpo-beta05  step 10" in screen_text(app), what="B's older step")
        await wait_until(
            pilot,
            lambda: "1 differ" in screen_text(app) and "only in B" not in screen_text(app),
            what="B's rows at step 10",
        )  # 85 vs 75 on 47+38=; 2+2= not logged yet
        assert app.want.compare_samples == ((runs["done"], None), (runs["running"], 10))
        await pilot.press("left_square_bracket")  # A back to step 20: both say 75
        await wait_until(
            pilot,
            lambda: "A ■ dpo-beta01  step 20" in screen_text(app) and "none differ" in screen_text(app),
            what="A's older step",
        )
        assert "held-out pairs" not in screen_text(app)  # A logged no pairs at step 20
        await pilot.press("b")  # two runs: a / b swap them
        await wait_until(pilot, lambda: "A ■ dpo-beta05" in screen_text(app), what="swapped")
        await pilot.press("2")  # back to the curves
        await wait_until(pilot, lambda: screen.query_one("#compare-chart").display, what="the curves again")
        assert app.want.compare_samples == ()


def test_match_samples_by_prompt_text():
    from tuiapp.data import match_samples

    a = [
        {"prompt": "1+1=", "policy": "2"},
        {"prompt": "2+2=", "policy": "4"},
        {"prompt": "x", "policy": "y"},
        {"kind": "preference", "prompt": "p", "chosen": "c", "rejected": "r", "margin": 1.0},
    ]
    b = [
        {"prompt": "2+2=", "policy": "5"},
        {"prompt": "1+1=", "policy": "2"},
        {"prompt": "1+1=", "policy": "late"},
        {"prompt": "z", "policy": "w"},
        {"kind": "preference", "prompt": "p", "chosen": "c", "rejected": "r", "margin": -1.0},
    ]
    m = match_samples(a, b)
    assert [(p, ra["policy"], rb["policy"]) for p, ra, rb in m.shared] == [("1+1=", "2", "2"), ("2+2=", "4", "5")]
    assert (m.only_a, m.only_b, m.differing) == (1, 1, 1)
    assert [(p, ra["margin"], rb["margin"]) for p, ra, rb in m.pairs] == [("p", 1.0, -1.0)]


def test_system_figures_put_the_gpu_first_and_fall_back_on_rss_and_cpu():
    from tuiapp.data import ProcFigures, RunDetail, SeriesData
    from tuiapp.screens.run_text import sys_text

    def detail(series, proc=None):
        from tuiapp.data import RunInfo

        run = RunInfo(
            id="r",
            name="r",
            status="running",
            algorithm="dpo",
            model="m",
            dataset="d",
            step=3,
            total_steps=9,
            created_at=None,
            started_at=None,
            finished_at=None,
            parent=None,
            waiting=False,
            cancel_requested=False,
            error=None,
            out_dir="",
            spec={},
        )
        return RunDetail(
            run, {k: SeriesData([1, 2, 3], v, [0, 1, 2]) for k, v in series.items()}, [], None, [], [], "", proc
        )

    gpu = sys_text(
        detail(
            {
                "sys/gpu_util": [20.0, 60.0, 87.0],
                "sys/gpu_mem_gb": [1.5, 1.5, 1.5],
                "sys/cpu_percent": [99.0, 101.0, 97.0],
            }
        )
    ).plain
    assert gpu.startswith("system gpu 87% ") and "gpu mem 1.5 GB" in gpu and "cpu 97%" in gpu
    assert gpu.index("gpu 87%") < gpu.index("gpu mem") < gpu.index("cpu") and gpu.endswith("(last logged)")
    assert "rss" not in gpu
    cpu = sys_text(detail({"sys/rss_gb": [0.4, 0.41, 0.42], "sys/cpu_percent": [50.0, 180.0, 199.6]})).plain
    assert cpu == "system rss 0.42 GB · cpu 200%  (last logged)"
    live = sys_text(
        detail(
            {"sys/gpu_mem_gb": [2.0, 2.0, 2.0], "sys/cpu_percent": [5.0, 5.0, 5.0]},
            ProcFigures(pid=42, rss_gb=1.25, cpu_pct=150.0, threads=7),
        )
    ).plain
    assert live == "system gpu mem 2 GB · rss 1.25 GB · cpu 150% · threads 7  (pid 42, gpu as last logged)"
    assert sys_text(detail({})).plain == ""


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
        await wait_until(
            pilot, lambda: isinstance(app.screen, CompareScreen) and app.screen.query(Chart), what="compare"
        )
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
        await wait_until(
            pilot,
            lambda: "2,000 rows" in str(form.query_one("#dataset-preview", Static).render()),
            what="dataset preview",
        )
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
async def test_new_run_shows_sampling_and_reward_fields_for_online_presets(home):
    from textual.widgets import Input, Select, Static

    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        form = await open_form(pilot)
        assert not form.query_one("#row-rewards").display  # DPO trains on fixed pairs: no sampling fields
        form.query_one("#f-preset", Select).value = "demo/grpo"
        await wait_until(pilot, lambda: form.preset == "demo/grpo", what="grpo preset")
        assert form.query_one("#row-rewards").display and form.query_one("#f-num_generations", Input).value == "8"
        assert form.query_one("#f-rewards", Input).value == "exact_match"
        form.query_one("#f-rewards", Input).value = "exact_match,length:3"
        form.query_one("#f-num_generations", Input).value = "1"
        await pilot.pause(0.1)
        assert "num_generations must be >= 2" in str(form.query_one("#msg-num_generations", Static).render())
        form.query_one("#f-num_generations", Input).value = "4"
        await pilot.pause(0.1)
        command = str(form.query_one("#command", Static).render())
        assert "--set rewards=exact_match,length:3" in command and "--set num_generations=4" in command
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: app.screen is not form, timeout=15, what="form closed")
        store = Store(store_path(home))
        (run,) = store.list_runs()
        assert run.spec["algorithm"] == "grpo" and run.spec["rewards"] == ["exact_match", "length:3"]
        assert run.spec["num_generations"] == 4
        store.close()


@pytest.mark.asyncio
async def test_new_run_sets_the_online_dpo_judge_template(home):
    from textual.widgets import Input, Select, Static

    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        form = await open_form(pilot)
        form.query_one("#f-preset", Select).value = "demo/online_dpo"
        await wait_until(pilot, lambda: form.preset == "demo/online_dpo", what="online_dpo preset")
        assert form.query_one("#row-judge_template").display and form.query_one("#f-judge_template", Input).value == ""
        form.query_one("#f-judge", Input).value = "demo"
        form.query_one("#f-judge_template", Input).value = "Shorter wins.\\n{prompt}\\n1: {answer_1}"
        await pilot.pause(0.1)
        assert "judge_template lacks {answer_2}" in str(form.query_one("#msg-judge_template", Static).render())
        form.query_one("#f-judge_template", Input).value = "Shorter wins.\\n{prompt}\\n1: {answer_1}\\n2: {answer_2}"
        await pilot.pause(0.1)
        assert not form.query_one("#row-judge_template").has_class("-invalid")
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: app.screen is not form, timeout=15, what="form closed")
        store = Store(store_path(home))
        (run,) = store.list_runs()
        assert run.spec["judge_template"] == "Shorter wins.\n{prompt}\n1: {answer_1}\n2: {answer_2}"
        assert run.spec["judge"].endswith("model")  # "demo" resolved to the demo model's directory
        store.close()


@pytest.mark.asyncio
async def test_new_run_saves_and_loads_a_preset_of_your_own(home):
    import yaml
    from textual.widgets import Input, Select

    from tuiapp.screens.preset_dialog import LoadPresetDialog, SavePresetDialog

    app = make_app(home)
    async with app.run_test(size=(80, 24)) as pilot:
        form = await open_form(pilot)
        form.query_one("#f-beta", Input).value = "0.3"
        form.query_one("#f-max_steps", Input).value = "7"
        await pilot.pause(0.1)
        await pilot.press("f2")
        await wait_until(pilot, lambda: isinstance(app.screen, SavePresetDialog), what="save dialog")
        app.screen.query_one("#preset-target", Input).value = "beta03"
        await pilot.press("enter")
        saved = home / "presets" / "beta03.yaml"
        await wait_until(pilot, lambda: saved.exists() and app.screen is form, what="preset saved")
        values = yaml.safe_load(saved.read_text())
        assert values["beta"] == 0.3 and values["max_steps"] == 7 and values["model"] == "demo"
        assert str(saved) in [v for _, v in form.presets]

        # saving again under the same name asks once before replacing
        await pilot.press("f2")
        await wait_until(pilot, lambda: isinstance(app.screen, SavePresetDialog), what="save dialog")
        app.screen.query_one("#preset-target", Input).value = "beta03"
        await pilot.press("enter")
        await wait_until(pilot, lambda: "exists" in screen_text(app), what="the replace question")
        assert isinstance(app.screen, SavePresetDialog)
        await pilot.press("escape")

        form.query_one("#f-preset", Select).value = "dpo"  # elsewhere, then load it back
        await wait_until(
            pilot, lambda: form.preset == "dpo" and form.query_one("#f-beta", Input).value == "0.1", what="dpo preset"
        )
        await pilot.press("f3")
        await wait_until(pilot, lambda: isinstance(app.screen, LoadPresetDialog), what="load dialog")
        assert "beta03" in screen_text(app)
        await pilot.press("enter")  # the highlighted (only) saved preset
        await wait_until(pilot, lambda: form.preset == str(saved), what="preset loaded")
        assert form.query_one("#f-beta", Input).value == "0.3" and form.query_one("#f-max_steps", Input).value == "7"
        assert form.query_one("#f-preset", Select).value == str(saved)
        assert f"--preset {saved}" in str(form.query_one("#command").render())

        await pilot.press("f3")  # a path that is no preset: refused, the form keeps its values
        await wait_until(pilot, lambda: isinstance(app.screen, LoadPresetDialog), what="load dialog")
        app.screen.query_one("#preset-source", Input).value = str(home / "missing.yaml")
        await pilot.press("tab")
        app.screen.query_one("#preset-source", Input).focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.screen is form, what="dialog closed")
        await pilot.pause(0.1)
        assert form.preset == str(saved) and form.query_one("#f-beta", Input).value == "0.3"
        assert "unknown preset" in str(form.query_one("#msg-preset").render())


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
        await wait_until(
            pilot,
            lambda: "no known dataset format" in str(form.query_one("#dataset-preview", Static).render()),
            what="format problem in the preview",
        )
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

    from tests.e2e.test_jobs import WorkerProcess

    worker = WorkerProcess(home)
    app = make_app(home)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            form = await open_form(pilot)
            form.query_one("#f-preset", Select).value = "dpo"
            await pilot.pause(0.2)
            values = {
                "model": str(tiny_model_dir),
                "dataset": str(tiny_pairs),
                "name": "e2e",
                "lr": "1e-3",
                "batch_size": "4",
                "grad_accum": "1",
                "max_steps": "3",
                "eval_steps": "0",
                "sample_steps": "0",
                "save_steps": "5",
                "num_threads": "1",
                "max_length": "64",
                "max_prompt_length": "32",
            }
            for key, value in values.items():
                form.query_one(f"#f-{key}", Input).value = value
            form.query_one("#f-extra", Input).value = "num_samples=0 kl_samples=0 max_new_tokens=4"
            await pilot.pause(0.2)
            assert form.validate(), form.errors
            await pilot.press("ctrl+s")
            await wait_until(pilot, lambda: app.screen is not form, timeout=15, what="submitted")
            await wait_until(
                pilot,
                lambda: app.snapshot and any(r.name == "e2e" and r.status == "completed" for r in app.snapshot.runs),
                timeout=120,
                what="the run to complete",
            )
            await focus_run(pilot, next(r.id for r in app.snapshot.runs if r.name == "e2e"))
            await wait_until(pilot, lambda: "train/loss" in screen_text(app), what="its loss curve")
            assert "3/3" in screen_text(app)
    finally:
        worker.stop()


def test_cli_demo_opens_the_app_on_the_queued_run(home, monkeypatch):
    """`cherry demo --method sft` (a terminal, no --headless): the run is queued, a worker started, the app opened on it."""
    from typer.testing import CliRunner

    import tuiapp.app
    import tuiapp.cli.demo
    import tuiapp.launch
    from tuiapp.cli import app as cli

    opened, started = [], []
    monkeypatch.setattr(tuiapp.cli.demo, "_interactive", lambda: True)
    monkeypatch.setattr(tuiapp.app, "run_app", lambda home=None, focus=None: opened.append((home, focus)))
    monkeypatch.setattr(tuiapp.launch, "start_worker", lambda h: started.append(h) or 4242)
    result = CliRunner().invoke(cli, ["demo", "--method", "sft", "--set", "max_steps=3"])
    assert result.exit_code == 0, result.output
    store = Store(store_path(home))
    (run,) = store.list_runs()
    store.close()
    assert run.status == "queued" and run.algorithm == "sft" and run.spec["max_steps"] == 3 and run.task_id
    assert opened == [(home, run.id)] and started == [home]
    assert "pid 4242" in result.output and "keeps going" in result.output

    result = CliRunner().invoke(cli, ["demo", "--out", str(home / "x")])
    assert result.exit_code == 2 and "--out goes with --headless" in result.output
    result = CliRunner().invoke(cli, ["demo", "--method", "nope"])
    assert result.exit_code == 2 and "no demo run" in result.output


@pytest.mark.asyncio
async def test_demo_launch_starts_a_detached_worker_that_outlives_the_app(home):
    """What `cherry demo` does: queue the demo run, start a worker (none is live), open the app on the run.
    The run completes; after the app quits the worker is still there, and a second launch reuses it."""
    import os
    import signal

    from jobs.store import pid_alive
    from tuiapp.app import CherryApp
    from tuiapp.launch import WORKER_LOG, ensure_worker, launch_demo
    from tuiapp.widgets.runs_table import RunsTable

    quick = ["max_steps=2", "eval_max_examples=8", "num_samples=2", "kl_samples=2", "num_threads=1"]
    run, pid = launch_demo(home, "dpo", quick)
    assert pid is not None
    try:
        assert ensure_worker(home) is None  # started a moment ago (not beating yet, maybe): not started twice
        app = CherryApp(home, poll_live=0.1, poll_idle=0.2, focus=run.id)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(
                pilot, lambda: app.screen.query_one(RunsTable).current_run_id == run.id, what="the demo run focused"
            )
            await wait_until(pilot, lambda: app.snapshot.live_workers == 1, timeout=20, what="the worker in the header")
            await wait_until(
                pilot, lambda: run_status(home, run.id) == "completed", timeout=120, what="the demo run to complete"
            )
            await wait_until(
                pilot, lambda: "completed" in screen_text(app) and "2/2" in screen_text(app), what="completed on screen"
            )
        assert pid_alive(pid), "the worker must keep running after the app quits"
        assert ensure_worker(home) is None  # a live worker: none started
        again, second = launch_demo(home, "dpo", quick)
        assert second is None
        await asyncio.to_thread(lambda: wait_for_status(home, again.id, "completed", 120))
        assert "cherry worker: home" in (home / WORKER_LOG).read_text()
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)  # our child: reap it


def wait_for_status(home: Path, run_id: str, status: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while run_status(home, run_id) != status:
        assert time.monotonic() < deadline, f"{run_id} did not reach {status}: {run_status(home, run_id)}"
        time.sleep(0.2)


# ----------------------------------------------------------------------------- the "Done when" walkthrough


async def tab_to(pilot, widget_id: str, limit: int = 60) -> None:
    """Press tab until the widget with this id has the focus (what a user does in the form)."""
    for _ in range(limit):
        if pilot.app.focused is not None and pilot.app.focused.id == widget_id:
            return
        await pilot.press("tab")
    raise AssertionError(f"tab never reached #{widget_id}; focus is on {pilot.app.focused!r}")


async def type_into(pilot, widget_id: str, value: str) -> None:
    """Tab to an input, clear it and type `value` key by key."""
    from textual.widgets import Input

    await tab_to(pilot, widget_id)
    box = pilot.app.focused
    assert isinstance(box, Input)
    await pilot.press("end", *["backspace"] * len(box.value))
    await pilot.press(*value)
    assert box.value == value, (widget_id, box.value)


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.parametrize("size", [(80, 24)], ids=["80x24"])  # the tight layout; snapshots cover 120x40
async def test_done_when_walkthrough(home, size):
    """The issue's "Done when", by keys, against `cherry worker` and the SQLite store: the demo run is
    queued as `cherry demo` does it; a second run with another lr is launched from the form; both
    curves overlay in compare; their samples side by side; the second run is cancelled; quit."""
    import os
    import signal

    from tuiapp.app import CherryApp
    from tuiapp.launch import launch_demo
    from tuiapp.screens.compare import CompareScreen
    from tuiapp.screens.new_run import NewRunScreen
    from tuiapp.widgets.chart import Chart
    from tuiapp.widgets.runs_table import RunsTable

    quick = ["max_steps=3", "eval_steps=0", "eval_max_examples=8", "num_samples=4", "kl_samples=4", "num_threads=1"]
    demo, pid = launch_demo(home, "dpo", quick)  # the run queued, a worker started (none was live)
    assert pid is not None
    try:
        app = CherryApp(home, poll_live=0.1, poll_idle=0.2, focus=demo.id)
        async with app.run_test(size=size) as pilot:
            table = app.screen.query_one(RunsTable)
            await wait_until(pilot, lambda: table.current_run_id == demo.id, what="the demo run focused")

            # a second run from the form: same preset, another lr, long enough to be cancelled while it runs
            await pilot.press("n")
            await wait_until(pilot, lambda: isinstance(app.screen, NewRunScreen), what="the new-run form")
            form = app.screen
            assert form.preset == "demo/dpo"
            for field, value in (
                ("f-name", "lr-1e-5"),
                ("f-lr", "1e-5"),
                ("f-max_steps", "5000"),
                ("f-eval_steps", "0"),
                ("f-save_steps", "5000"),
                ("f-num_threads", "1"),
                ("f-extra", "eval_max_examples=8 num_samples=4 kl_samples=4"),
            ):
                await type_into(pilot, field, value)
            await pilot.pause(0.1)
            assert "--set lr=1e-5" in str(form.query_one("#command").render())
            await pilot.press("ctrl+s")
            await wait_until(pilot, lambda: app.screen is not form, timeout=15, what="the form submitted")
            await wait_until(pilot, lambda: table.row_count == 2, what="two runs in the table")
            second = next(r for r in app.snapshot.runs if r.name == "lr-1e-5")
            assert second.spec["lr"] == 1e-5 and demo.spec["lr"] == 3e-5

            # select both (the cursor stays on the demo run; the new one is above it) and compare
            assert table.current_run_id == demo.id
            await pilot.press("space", "up")
            await wait_until(pilot, lambda: table.current_run_id == second.id, what="cursor on the second run")
            await pilot.press("space", "v")
            await wait_until(pilot, lambda: isinstance(app.screen, CompareScreen), what="compare")
            compare = app.screen
            chart = compare.query_one(Chart)
            # the compare view follows what both have logged: eval/* at step 0, then the loss once the second trains
            await wait_until(
                pilot,
                lambda: chart.title == "train/loss" and len(chart.curves) == 2,
                timeout=180,
                what="both runs' loss curves",
            )
            assert [c[0] for c in chart.curves] == [demo.name, "lr-1e-5"] and len({c[3] for c in chart.curves}) == 2
            text = screen_text(app)
            assert demo.name in text and "lr-1e-5" in text and any(0x2800 < ord(ch) <= 0x28FF for ch in text)

            # their samples side by side on the same prompts
            await pilot.press("2")
            await wait_until(
                pilot, lambda: "shared prompts" in screen_text(app), timeout=60, what="samples side by side"
            )
            text = screen_text(app)
            assert f"A ■ {demo.name}" in text and "B ■ lr-1e-5" in text and "4 shared prompts" in text

            # back to the runs, cancel the second run while it trains
            await pilot.press("escape")
            await wait_until(pilot, lambda: not isinstance(app.screen, CompareScreen), what="back to the runs")
            assert table.current_run_id == second.id
            assert run_status(home, second.id) == "running"
            await pilot.press("c")
            await wait_until(pilot, lambda: run_status(home, second.id) == "cancelled", timeout=60, what="cancelled")
            await wait_until(pilot, lambda: "cancelled" in screen_text(app), what="cancelled on screen")
            assert run_status(home, demo.id) == "completed"
            await pilot.press("q")
            await wait_until(pilot, lambda: not app.is_running, what="the app to quit")
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
