"""`cherry bench queue` in a tiny size: the several-machines invariants hold under a burst (none lost,
none run twice, every front end stores every run once), and the figures it reports are there."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from benchmarks.queue_load import priority_inversions
from tests.conftest import require_redis_server
from tuiapp.cli import app


def test_priority_inversions_count_only_runs_already_queued():
    queued = {
        "low": {"priority": 0, "enqueued_at": 1.0},
        "high": {"priority": 10, "enqueued_at": 2.0},
        "late-high": {"priority": 10, "enqueued_at": 9.0},
    }
    # "low" was taken at 5 while "high" (queued at 2) waited: one inversion; "late-high" came after.
    taken = [
        {"run": "low", "worker": "a", "at": 5.0},
        {"run": "high", "worker": "a", "at": 6.0},
        {"run": "late-high", "worker": "a", "at": 10.0},
    ]
    assert priority_inversions(taken, queued) == {"a": 1}
    in_order = [taken[1], taken[0], taken[2]]
    assert priority_inversions(in_order, queued) == {"a": 0}


def test_without_redis_server_it_says_so_and_exits_0(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    done = CliRunner().invoke(app, ["bench", "queue", "--runs", "4"])
    assert done.exit_code == 0 and "needs a local redis-server" in done.output and "Nothing was measured" in done.output


def test_a_small_burst_from_two_front_ends_is_stored_once_and_run_once():
    require_redis_server()
    args = ["bench", "queue", "--runs", "10", "--streams", "2", "--app-seconds", "3", "--json"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    result = json.loads(done.output)
    assert result["runs"] == 10 and result["completed"] == 10
    assert result["in_redis"] == 10 and result["redis_equals_submitted"]
    assert result["lost"] == 0 and result["run_twice"] == [] and result["unknown_executed"] == []
    # A task can be taken twice (the lost-run sweep re-queues a run popped a moment ago); it runs once.
    assert sum(result["taken_by_worker"].values()) >= 10
    for front in result["front_ends"]:
        assert front["submitted"] == 5 and front["stored"] == 10 and front["stored_equals_submitted"]
        assert front["metric_rows"] == result["expected_metric_rows"] and front["ingest_again_adds_nothing"]
    assert result["status_lag_s"]["n"] == 10 and result["ingest_lag_s"]["n"] == 10
    app_figures = result["app"]
    assert app_figures["runs_shown"] == 12 and app_figures["snapshots"] > 0
    assert app_figures["frame_s"]["n"] > 0 and app_figures["ingest_lag_s"]["n"] > 0
