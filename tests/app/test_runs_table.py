"""The runs list stays cheap with hundreds of runs: a snapshot updates only the cells that changed, and a
column is re-measured (every row of it) only when a new value is wider than the column."""

from __future__ import annotations

import dataclasses

import pytest
from rich.text import Text
from textual.app import App

from tuiapp.data import RunInfo
from tuiapp.widgets.runs_table import RunsTable, same_cell

NOW = 1_800_000_000.0


def run_info(i: int, **fields) -> RunInfo:
    values = dict(
        id=f"run-{i:03d}",
        name=f"run-{i:03d}",
        status="completed",
        algorithm="dpo",
        model="m",
        dataset="d",
        step=5,
        total_steps=5,
        created_at=NOW - 3600,
        started_at=NOW - 3600,
        finished_at=NOW - 3000,
        parent=None,
        waiting=False,
        cancel_requested=False,
        error=None,
        out_dir="",
        spec={},
    )
    values.update(fields)
    return RunInfo(**values)


def test_same_cell_sees_a_style_change():
    assert same_cell(Text("running", style="green"), Text("running", style="green"))
    assert not same_cell(Text("running", style="green"), Text("running", style="red"))
    assert not same_cell("5", 5) and same_cell("dpo", "dpo")


@pytest.mark.asyncio
async def test_a_snapshot_updates_only_the_changed_cells_of_200_runs():
    class Host(App):
        def compose(self):
            yield RunsTable()

    app = Host()
    async with app.run_test(size=(120, 40)) as pilot:
        table = app.query_one(RunsTable)
        runs = [run_info(i, status="running", step=1, total_steps=10) if i < 8 else run_info(i) for i in range(200)]
        table.show(runs, set(), NOW)
        await pilot.pause()
        calls = []
        update = table.update_cell

        def spy(row_key, column_key, value, *, update_width=False):
            calls.append((row_key, column_key, update_width))
            update(row_key, column_key, value, update_width=update_width)

        table.update_cell = spy
        table.show(runs, set(), NOW)
        assert calls == []  # nothing changed, nothing touched
        runs[0] = dataclasses.replace(runs[0], step=2)
        runs[1] = dataclasses.replace(runs[1], step=10_000, total_steps=100_000)
        table.show(runs, set(), NOW)
        assert {row for row, _, _ in calls} == {"run-000", "run-001"}  # step (and ETA) of the two changed runs
        assert ("run-000", "step", False) in calls and ("run-001", "step", True) in calls  # only 10000/100000 widens
        await pilot.pause()
        assert str(table.get_cell("run-001", "step")) == "10000/100000"
