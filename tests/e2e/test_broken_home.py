"""A home whose files cannot be used: every front end names the file, says what to do, exits non-zero,
and leaves every file exactly as it was. Real files and real processes: a store overwritten with
garbage, a truncated store, a store from a newer Cherry, a damaged queue file, a read-only home."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.home import store_path
from jobs.queue import JobQueue
from jobs.store import Store, StoreError
from jobs.store_schema import SCHEMA_VERSION

RUN_ID = "20261201-120000-dpo-demo"


def make_home(home: Path) -> Path:
    """A home with one run in its store and a queue file, as `cherry submit` leaves it."""
    store = Store(store_path(home))
    store.create_run(RUN_ID, {"algorithm": "dpo"}, name="dpo-demo", out_dir=str(home / RUN_ID))
    for step in range(1, 200):
        store.add_metrics(RUN_ID, step, {f"m{i}": float(i) for i in range(20)})
    store.close()
    queue = JobQueue(home)
    queue.enqueue(RUN_ID)
    queue.huey.storage.close()
    (home / RUN_ID).mkdir()
    (home / RUN_ID / "metrics.jsonl").write_text('{"step": 1}\n')
    return home


def snapshot(home: Path) -> dict[str, bytes]:
    return {str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*")) if p.is_file()}


def cherry(home: Path, *args: str, preexec=None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "CHERRY_HOME": str(home)}
    env.pop("CHERRY_REDIS_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "tuiapp.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec,
        stdin=subprocess.DEVNULL,
    )


# Every front end that opens the store: the reading commands, submit, the foreground trainer, the
# app (no command) and the worker.
FRONT_ENDS = [
    ("ls",),
    ("show", RUN_ID),
    ("metrics", RUN_ID),
    ("submit", "--preset", "demo/dpo", "--model", "demo"),
    ("train", "--preset", "demo/dpo", "--model", "demo", "--set", "max_steps=1"),
    (),  # the app
    ("worker",),
]


def assert_refused(result: subprocess.CompletedProcess, *words: str) -> str:
    err = result.stderr
    assert result.returncode == 2, (result.returncode, result.stdout, err)
    assert "Traceback" not in err + result.stdout, err
    assert err.count("error:") == 1, err
    for word in words:
        assert word in err, (word, err)
    return err


@pytest.mark.parametrize("args", FRONT_ENDS, ids=lambda a: " ".join(a) or "app")
def test_a_store_overwritten_with_garbage_is_named_and_kept(tmp_path, args):
    home = make_home(tmp_path / "home")
    db = store_path(home)
    db.write_bytes(b"these are the notes I saved over cherry.db by mistake\n" * 200)
    before = snapshot(home)
    err = assert_refused(
        cherry(home, *args),
        f"the run store {db} is damaged or not a Cherry file",
        "file is not a database",
        "never overwrites it",
        f"mv {db} {db}.broken",
    )
    assert "run directory beside it keeps" in err
    assert snapshot(home) == before  # nothing written, moved or created: no run directory, no -wal file


def test_a_truncated_store_is_named_and_kept(tmp_path):
    home = make_home(tmp_path / "home")
    db = store_path(home)
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])  # a copy cut off half-way
    before = snapshot(home)
    assert_refused(cherry(home, "ls"), f"the run store {db} is damaged", "malformed", "mv ")
    assert snapshot(home) == before


def test_after_moving_the_broken_store_aside_cherry_starts_a_new_one_and_the_runs_stay(tmp_path):
    home = make_home(tmp_path / "home")
    db = store_path(home)
    db.write_bytes(b"\0garbage" * 100)
    db.rename(db.with_name("cherry.db.broken"))
    result = cherry(home, "ls")
    assert result.returncode == 0 and "no runs in" in result.stdout, result.stderr
    assert (home / "cherry.db.broken").read_bytes() == b"\0garbage" * 100
    assert (home / RUN_ID / "metrics.jsonl").read_text() == '{"step": 1}\n'


@pytest.mark.parametrize("args", [("ls",), (), ("worker",)], ids=["ls", "app", "worker"])
def test_a_store_from_a_newer_cherry_is_refused_and_never_written(tmp_path, args):
    home = make_home(tmp_path / "home")
    store = Store(store_path(home))
    store.db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    store.close()
    before = snapshot(home)
    assert_refused(
        cherry(home, *args),
        f"the run store {store_path(home)} was written by a newer Cherry",
        f"schema version {SCHEMA_VERSION + 1}",
        "Upgrade Cherry",
    )
    assert snapshot(home) == before


def test_a_store_error_in_python_is_a_store_error_with_the_same_message(tmp_path):
    """In process (the app's reader thread, a worker's threads) the failure is a CherryError too."""
    path = tmp_path / "cherry.db"
    path.write_bytes(b"not sqlite" * 50)
    with pytest.raises(StoreError, match="is damaged or not a Cherry file"):
        Store(path)
    assert path.read_bytes() == b"not sqlite" * 50


@pytest.mark.parametrize(
    "args", [("submit", "--preset", "demo/dpo", "--model", "demo"), ("worker",)], ids=["submit", "worker"]
)
def test_a_damaged_queue_file_is_named_and_kept(tmp_path, args):
    home = make_home(tmp_path / "home")
    queue = home / "queue.db"
    queue.write_bytes(b"\x89PNG this is a picture, not a queue" * 40)
    before = snapshot(home)
    err = assert_refused(
        cherry(home, *args),
        f"the queue file {queue} is damaged",
        "never overwrites it",
        "cherry cancel RUN` then `cherry resume RUN",
    )
    assert "run store" not in err
    after = snapshot(home)
    assert after == before  # submit refused before writing a run row or a run directory
    store = Store(store_path(home))
    assert [r.id for r in store.list_runs()] == [RUN_ID]
    store.close()


# ----------------------------------------------------------------------------- read-only home

CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 1, 2, 3
PR_CAPBSET_DROP = 24


def _drop_root_override() -> None:
    """In the child before exec: give up root's power to write where permissions say no (it keeps uid 0,
    so it still reads its own files). Dropped from the bounding set, the capabilities are gone after exec."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


@pytest.fixture
def read_only_home(tmp_path):
    """A real home made read-only with chmod, and how to run a process that the permissions bind.

    As a normal user chmod is enough. Root ignores permissions, so its processes run without the
    capabilities that let it; where that cannot be done the test is skipped, saying why."""
    home = make_home(tmp_path / "home")
    for path in [home, *home.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    preexec = _drop_root_override if os.geteuid() == 0 else None
    probe = subprocess.run(
        [sys.executable, "-c", f"open({str(home / 'probe')!r}, 'w')"],
        preexec_fn=preexec,
        capture_output=True,
        text=True,
    )
    try:
        if probe.returncode == 0:
            pytest.skip(
                "this process can write into a chmod 555 directory (root with capabilities it cannot drop here)"
            )
        yield home, preexec
    finally:
        for path in [home, *home.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.mark.parametrize(
    "args",
    [("ls",), ("submit", "--preset", "demo/dpo", "--model", "demo"), (), ("worker",)],
    ids=["ls", "submit", "app", "worker"],
)
def test_a_read_only_home_is_named_with_the_fix(read_only_home, args):
    home, preexec = read_only_home
    before = snapshot(home)
    assert_refused(
        cherry(home, *args, preexec=preexec),
        "cannot be written",
        f"Cherry's home {home} is read-only",
        "chmod u+w",
        "CHERRY_HOME",
    )
    assert snapshot(home) == before


def test_a_home_that_cannot_be_created_is_named(tmp_path):
    parent = tmp_path / "file-not-dir"
    parent.write_text("x")
    result = cherry(parent / "home", "ls")
    assert_refused(result, f"cannot create Cherry's home {parent / 'home'}", "set CHERRY_HOME")
