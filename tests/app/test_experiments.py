"""Experiments in the app: runs grouped by experiment (fold, best first, tags), the experiment view
(curves coloured by a swept value, results table, reward-vs-KL frontier), the spec diff wherever runs
are compared, and the new-run form queuing a sweep; plus the pure functions behind them."""

from __future__ import annotations

import pytest

from jobs.home import store_path
from jobs.store import Store
from tests.app.app_fixtures import add_experiment, populate, screen_text
from tests.app.test_app import make_app, open_form, wait_until
from tuiapp.data import RunInfo, SeriesData
from tuiapp.experiment import (
    GROUP_KEY,
    Group,
    experiment_metric,
    group_name,
    grouped,
    pareto,
    results,
    value_colours,
)
from tuiapp.text import spec_diff

# ----------------------------------------------------------------------------- pure functions


def _run(run_id: str, experiment: str | None = None, metric=None, created: float = 0.0, **extra) -> RunInfo:
    return RunInfo(
        id=run_id, name=run_id, status=extra.pop("status", "completed"), algorithm="dpo", model="demo",
        dataset="d", step=0, total_steps=0, created_at=created, started_at=None, finished_at=None, parent=None,
        waiting=False, cancel_requested=False, error=None, out_dir="", spec={}, key_metric=metric,
        experiment=experiment, **extra,
    )  # fmt: skip


def test_spec_diff_names_the_settings_that_differ_nested_and_missing_ones_too():
    a = {"name": "a", "lr": 1e-6, "beta": 0.1, "lora": {"r": 8, "alpha": 16}, "seed": 0}
    b = {"name": "b", "lr": 2e-6, "beta": 0.1, "lora": {"r": 16, "alpha": 16}, "seed": 0, "loss_type": "ipo"}
    assert spec_diff([a, b]) == [("lr", [1e-6, 2e-6]), ("lora.r", [8, 16]), ("loss_type", [None, "ipo"])]
    assert spec_diff([a, {**a, "name": "other"}]) == []  # the name alone is no setting
    assert spec_diff([a, a, {**a, "beta": 0.3}]) == [("beta", [0.1, 0.1, 0.3])]


def test_pareto_keeps_the_runs_no_other_beats_on_both_kl_and_reward():
    # (KL, reward): low KL and high reward are better
    points = [(0.1, 0.5), (0.3, 0.7), (0.2, 0.4), (1.0, 0.7), (1.5, 0.9), (0.1, 0.5)]
    assert pareto(points) == {0, 1, 4, 5}  # 2 is beaten by 0; 3 by 1 (same reward, more KL); ties both stay
    assert pareto([]) == set()


def test_runs_group_by_experiment_best_first_where_the_newest_run_sits():
    rule = {"rule": "median", "metric": "eval/loss", "mode": "min"}
    runs = [
        _run("solo-new", created=9),
        _run("s-b", "sweep", ("eval/loss", 0.5), 8, prune=rule),
        _run("solo-old", created=7),
        _run("s-a", "sweep", ("eval/loss", 0.3), 6, prune=rule),
        _run("s-c", "sweep", None, 5, prune=rule),
    ]
    rows = grouped(runs, set())
    assert [r.key if isinstance(r, Group) else r.id for r in rows] == [
        "solo-new", GROUP_KEY + "sweep", "s-a", "s-b", "s-c", "solo-old",
    ]  # fmt: skip
    group = rows[1]
    assert (group.metric, group.lower, group.best.id, group.best_value) == ("eval/loss", True, "s-a", 0.3)
    assert group.counts() == {"completed": 3} and group_name(group.key) == "sweep" and group_name("s-a") is None
    folded = grouped(runs, {"sweep"})
    assert [r.key if isinstance(r, Group) else r.id for r in folded] == ["solo-new", GROUP_KEY + "sweep", "solo-old"]
    # no rule: the key metric most runs show, higher is better for accuracy
    assert experiment_metric([_run("x", "e", ("eval/exact_match", 0.5))]) == ("eval/exact_match", False)


def test_swept_values_get_colours_low_to_high():
    colours = value_colours(["1e-5", "1e-6", "1e-4", "1e-6"])
    assert list(colours) == ["1e-6", "1e-5", "1e-4"] and len(set(colours.values())) == 3
    assert colours["1e-6"] == "dodger_blue1" and colours["1e-4"] == "red1"  # cool to warm
    assert list(value_colours(["sigmoid", "ipo"])) == ["sigmoid", "ipo"]  # not numbers: as given


def test_results_rank_runs_by_their_best_value_and_mark_the_front():
    def series(em: list[float], kl: list[float]) -> dict[str, SeriesData]:
        steps = list(range(0, 10 * len(em), 10))
        return {"eval/exact_match": SeriesData(steps, em, steps), "kl/mean": SeriesData(steps, kl, steps)}

    runs = [
        _run("a", "e", swept={"lr": "1e-6"}),
        _run("b", "e", swept={"lr": "1e-5"}),
        _run("c", "e", swept={"lr": "1e-4"}),
    ]
    data = {
        "a": series([0.5, 0.52], [0.0, 0.01]),
        "b": series([0.5, 0.7, 0.6], [0.0, 0.2, 0.3]),
        "c": series([0.5, 0.55], [0.0, 0.5]),
    }
    rows, y_name = results(runs, data, "eval/exact_match", lower=False)
    assert [r.run.id for r in rows] == ["b", "c", "a"] and y_name == "eval/exact_match"
    assert (rows[0].best, rows[0].final, rows[0].kl, rows[0].reward) == (0.7, 0.6, 0.3, 0.6)
    assert [r.on_front for r in rows] == [True, False, True]  # c: more KL than b for less reward
    assert rows[0].values == {"lr": "1e-5"}


def test_a_list_in_a_numeric_field_is_a_sweep():
    from tuiapp.screens.new_run_fields import submit_command, sweep_grid

    defaults = {"lr": 3e-5, "beta": 0.1, "loss_type": "sigmoid", "max_steps": 0, "bf16": False, "seed": None}
    values = {"lr": "5e-7, 1e-6,2e-6", "beta": "0.1", "loss_type": "sigmoid,ipo", "bf16": "true,false", "seed": "1,2"}
    assert sweep_grid(values, defaults) == {"lr": ["5e-7", "1e-6", "2e-6"], "seed": ["1", "2"]}
    line = submit_command("demo/dpo", "demo", "", ["beta=0.2"], None, {"lr": ["1e-6", "2e-6"]}, "scan")
    assert line == "cherry sweep --preset demo/dpo --model demo --set beta=0.2 --grid lr=1e-6,2e-6 --name scan"


# ----------------------------------------------------------------------------- the app


@pytest.fixture
def sweep(home) -> list[str]:
    populate(home)
    return add_experiment(home)


def table_keys(app) -> list[str]:
    from tuiapp.widgets.runs_table import RunsTable

    return [k.value for k in app.screen.query_one(RunsTable).rows]


async def to_group(pilot, name: str = "lr-beta") -> None:
    from tuiapp.widgets.runs_table import RunsTable

    await wait_until(pilot, lambda: GROUP_KEY + name in table_keys(pilot.app), what="the group row")
    table = pilot.app.screen.query_one(RunsTable)
    table.move_cursor(row=table_keys(pilot.app).index(GROUP_KEY + name))
    await pilot.pause(0.1)


@pytest.mark.asyncio
@pytest.mark.parametrize("size", [(120, 40), (80, 24)])
async def test_runs_table_groups_an_experiment_best_first_and_folds(home, sweep, size):
    app = make_app(home)
    async with app.run_test(size=size) as pilot:
        await to_group(pilot)
        keys = table_keys(app)
        at = keys.index(GROUP_KEY + "lr-beta")
        # best eval/exact_match first: 0.66 (lr 1e-4, beta 0.3), 0.62, 0.58, then the pruned and weak ones
        assert keys[at + 1 : at + 4] == [sweep[5], sweep[2], sweep[3]]
        assert set(keys[at + 1 : at + 7]) == set(sweep)
        text = screen_text(app)
        assert "▾ lr-beta (6)" in text and "lr1e-4-beta0.3 #good" in text and "4✓" in text and "2✂" in text
        # the group row shows its best run in the detail pane
        await wait_until(pilot, lambda: app.snapshot.detail and app.snapshot.detail.run.id == sweep[5], what="best")
        await pilot.press("4")  # its spec tab: experiment, swept values, tags and note
        await wait_until(pilot, lambda: "note      best so far: try 2e-4" in screen_text(app), what="the note")
        assert "experiment lr-beta  lr=1e-4  beta=0.3" in screen_text(app) and "tags      #good" in screen_text(app)
        await pilot.press("enter")  # enter on the group row folds it
        await wait_until(pilot, lambda: sweep[0] not in table_keys(app), what="folded")
        assert "▸ lr-beta (6)" in screen_text(app) and GROUP_KEY + "lr-beta" in table_keys(app)
        await pilot.press("g")  # and g unfolds it again
        await wait_until(pilot, lambda: sweep[0] in table_keys(app), what="unfolded")
        await pilot.click("#runs", offset=(4, 1 + table_keys(app).index(GROUP_KEY + "lr-beta")))  # below the header
        await wait_until(pilot, lambda: sweep[0] not in table_keys(app), what="folded by clicks")


@pytest.mark.asyncio
async def test_tags_and_swept_values_filter_the_runs(home, sweep):
    from textual.widgets import Input

    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        await to_group(pilot)
        await pilot.press("slash")
        app.screen.query_one("#filter", Input).value = "#good"
        await wait_until(pilot, lambda: len(table_keys(app)) == 2, what="only the tagged run")
        assert table_keys(app) == [GROUP_KEY + "lr-beta", sweep[5]]
        app.screen.query_one("#filter", Input).value = "lr=1e-5"
        await wait_until(pilot, lambda: table_keys(app) == [GROUP_KEY + "lr-beta", sweep[2], sweep[3]], what="lr")


@pytest.mark.asyncio
@pytest.mark.parametrize("size", [(120, 40), (80, 24)])
async def test_experiment_view_colours_by_value_ranks_runs_and_marks_the_frontier(home, sweep, size):
    from tuiapp.screens.experiment import FRONT, ExperimentScreen
    from tuiapp.widgets.chart import Chart

    app = make_app(home)
    async with app.run_test(size=size) as pilot:
        await to_group(pilot)
        await pilot.press("e")
        await wait_until(pilot, lambda: isinstance(app.screen, ExperimentScreen), what="experiment view")
        screen = app.screen
        curves = screen.query_one("#exp-curves", Chart)
        await wait_until(pilot, lambda: len(curves.curves) == 6, what="six curves")
        assert set(app.want.compare) == set(sweep)
        assert curves.title.startswith("eval/exact_match")
        colour = {label: c for label, _, _, c in curves.curves}
        # coloured by lr: runs with the same lr share a colour, the legend maps colour -> value
        assert colour["lr1e-6-beta0.1"] == colour["lr1e-6-beta0.3"] != colour["lr1e-5-beta0.1"]
        text = screen_text(app)
        assert "lr ■ 1e-6  ■ 1e-5  ■ 1e-4" in text
        lines = [line for line in text.splitlines() if "■ " in line and "beta" in line]
        assert [line.split()[3] for line in lines[:3]] == ["lr1e-4-beta0.3", "lr1e-5-beta0.1", "lr1e-5-beta0.3"]
        assert "★" in lines[0] and "★" not in lines[3]  # lr1e-4-beta0.1: more KL for less reward than others
        assert "differ" in text and "beta" in text.split("differ")[1]
        frontier = screen.query_one("#exp-frontier", Chart)
        assert {label for label, *_ in frontier.curves} >= {"lr1e-4-beta0.3", FRONT}
        front = next(c for c in frontier.curves if c[0] == FRONT)
        assert front[1] == sorted(front[1]) and len(front[1]) == 5
        if size[0] < 110:  # narrow: f swaps the curves for the frontier
            assert not frontier.display
            await pilot.press("f")
            await wait_until(pilot, lambda: frontier.display and not curves.display, what="frontier")
            assert "vs KL" in screen_text(app)
        await pilot.press("c")  # colour by beta now
        await wait_until(pilot, lambda: "beta ■ 0.1  ■ 0.3" in screen_text(app), what="colour by beta")
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, ExperimentScreen), what="back")
        assert app.want.compare == ()


@pytest.mark.asyncio
async def test_compare_screen_shows_which_settings_differ(home, sweep):
    from tuiapp.screens.compare import CompareScreen
    from tuiapp.widgets.runs_table import RunsTable

    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        await to_group(pilot)
        table = app.screen.query_one(RunsTable)
        for run_id in (sweep[5], sweep[0]):
            table.move_cursor(row=table_keys(app).index(run_id))
            await pilot.pause(0.1)
            await pilot.press("space")
        await pilot.press("v")
        await wait_until(pilot, lambda: isinstance(app.screen, CompareScreen), what="compare")
        await wait_until(pilot, lambda: "differ" in screen_text(app), what="the spec diff")
        line = next(x for x in screen_text(app).splitlines() if "differ" in x)
        assert "beta" in line and "0.3 0.1" in line
        assert "lr " in screen_text(app).split("differ")[1] and "0.0001 1e-06" in screen_text(app)


@pytest.mark.asyncio
async def test_new_run_form_queues_a_sweep_from_a_list(home):
    from textual.widgets import Input, Static

    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        form = await open_form(pilot)
        assert not form.query_one("#row-experiment").display
        form.query_one("#f-lr", Input).value = "1e-5,-1"
        await pilot.pause(0.1)
        assert form.query_one("#row-experiment").display
        assert "sweep point lr=-1" in str(form.query_one("#msg-lr", Static).render())
        await pilot.press("ctrl+s")
        await pilot.pause(0.2)
        assert app.screen is form and Store(store_path(home)).list_runs() == []

        form.query_one("#f-lr", Input).value = "1e-5,2e-5"
        form.query_one("#f-max_steps", Input).value = "3"
        form.query_one("#f-experiment", Input).value = "from-form"
        await pilot.pause(0.1)
        assert not form.query_one("#row-lr").has_class("-invalid")
        command = str(form.query_one("#command", Static).render())
        assert "cherry sweep --preset demo/dpo" in command and "--grid lr=1e-5,2e-5 --name from-form" in command
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: app.screen is not form, timeout=15, what="form closed")
        store = Store(store_path(home))
        runs = store.list_runs(experiment="from-form")
        assert [r.spec["lr"] for r in runs] == [1e-5, 2e-5] and all(r.spec["max_steps"] == 3 for r in runs)
        assert [r.name for r in runs] == ["from-form-lr1e-5", "from-form-lr2e-5"]
        store.close()
        await wait_until(pilot, lambda: "▾ from-form (2)" in screen_text(app), what="the experiment in the table")


def test_the_spec_tab_says_which_host_and_gpus_a_run_holds():
    from tuiapp.screens.run_text import spec_text

    shown = spec_text(_run("r1", worker_host="gpu-box", gpus="0,1"), []).plain
    assert "ran on    gpu-box  GPU 0,1" in shown
    assert "ran on" not in spec_text(_run("r2"), []).plain  # queued: no worker yet
