"""The run store on its own: schema versions, status moves, rewinds, lookups."""

from __future__ import annotations

import dataclasses

import pytest

from jobs.store import Store, StoreError, StoreReporter
from jobs.store_schema import SCHEMA_VERSION, RunRow


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "cherry.db")


def test_a_new_store_is_wal_and_at_the_current_schema(store):
    assert store.db.journal_mode == "wal"
    assert store.schema_version() == SCHEMA_VERSION
    assert Store(store.path).schema_version() == SCHEMA_VERSION  # reopening migrates nothing twice


def test_a_store_from_a_newer_cherry_is_refused_clearly(store):
    store.db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="schema version 99; this Cherry reads up to"):
        Store(store.path)


def test_status_moves_only_from_the_states_allowed(store):
    store.create_run("a", {"algorithm": "dpo"}, name="a", out_dir="/x/a")
    assert not store.set_status("a", "completed", only_if=["running"])
    assert store.set_status("a", "running", only_if=["queued"])
    run = store.get_run("a")
    assert run.status == "running" and run.started_at and not run.ended
    assert store.set_status("a", "cancelled", only_if=["running"])
    assert store.get_run("a").finished_at and store.get_run("a").ended


def test_a_run_row_has_a_typed_attribute_for_every_column(store):
    columns = set(store.db["runs"].columns_dict)
    attributes = {f.name for f in dataclasses.fields(RunRow)} - {"row"}
    assert attributes == columns  # a migration's new column gets its attribute in RunRow
    store.create_run("a", {"algorithm": "dpo"}, name="a", out_dir="/x/a", swept={"lr": "1e-5"}, experiment="e")
    store.set_tags("a", ["good"])
    run = store.get_run("a")
    assert (run.spec, run.swept, run.tags, run.prune) == ({"algorithm": "dpo"}, {"lr": "1e-5"}, ["good"], None)
    assert (run.experiment, run.name, run.step, run.worker_host) == ("e", "a", 0, None)
    assert run.location == "/x/a" and run.row["swept"] == '{"lr": "1e-5"}'  # `row`: the columns as stored


def test_the_reporter_rewinds_to_a_checkpoint(store):
    store.create_run("a", {"algorithm": "dpo"}, name="a", out_dir="/x/a")
    reporter = StoreReporter(store, "a")
    reporter.log_event("start", "go", total_steps=10)
    for step in range(1, 8):
        reporter.log_metrics(step, {"train/loss": 1.0 / step, "note": "not a number"})
    reporter.log_samples(5, [{"prompt": "p", "reference": "r", "policy": "q", "policy_score": 1.0}])
    reporter.rewind(4)
    assert [r["step"] for r in store.metrics("a")] == [1, 2, 3, 4]  # non-numbers are not stored
    assert store.samples("a") == [] and store.get_run("a").step == 4 and store.get_run("a").total_steps == 10
    assert store.latest_metrics("a") == {"train/loss": 0.25}


def test_runs_are_found_by_any_unique_part_of_their_id_or_name(store):
    store.create_run("20261121-1-dpo-demo", {}, name="dpo-demo", out_dir="/x")
    store.create_run("20261121-2-kto-demo", {}, name="kto-demo", out_dir="/y")
    assert [r.id for r in store.find_runs("kto")] == ["20261121-2-kto-demo"]
    assert len(store.find_runs("demo")) == 2
    assert store.find_runs("20261121-1-dpo-demo")[0].name == "dpo-demo"


def test_an_older_store_is_migrated_in_place(tmp_path):
    import sqlite_utils

    from jobs.store_schema import MIGRATIONS

    db = sqlite_utils.Database(tmp_path / "old.db")
    MIGRATIONS[0](db)  # a store written by the first schema, with a run in it
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db["runs"].insert({"id": "old", "status": "completed", "spec": "{}"})
    db.conn.commit()
    db.conn.close()
    store = Store(tmp_path / "old.db")
    assert store.schema_version() == SCHEMA_VERSION
    assert store.get_run("old").status == "completed"
    store.worker_beat("h:1", host="h", pid=1, slots=1, busy=0, queue="sqlite")
    assert [w["id"] for w in store.live_workers()] == ["h:1"]
