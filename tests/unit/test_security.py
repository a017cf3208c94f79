"""Issue 33's attacks replayed on one machine (the SQLite queue and store): each must no longer work.

The Redis side (a pickle planted in Redis, masked passwords, malformed stream entries) is in
tests/e2e/test_security_redis.py; the app's rendering of escapes and markup in tests/app/test_app.py.
"""

from __future__ import annotations

import logging
import os
import pickle
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.errors import CherryError


class CreatesFileWhenUnpickled:
    """What an attacker puts on the queue: unpickling it creates `path` (it could as well run a shell)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _record_runs(seen: list[str]):
    return seen.append


# ------------------------------------------------------------------ 1. the queue carries JSON, never pickle


def test_a_pickled_payload_in_queue_db_is_dropped_not_executed(home, tmp_path, caplog):
    from jobs.queue import JobQueue

    marker = tmp_path / "pwned"
    producer = JobQueue(home)
    producer.enqueue("20260101-000000-good")
    # Planted straight into queue.db, ahead of the real run (a higher priority is taken first).
    producer.huey.storage.enqueue(pickle.dumps(CreatesFileWhenUnpickled(marker)), 10)
    producer.huey.storage.enqueue(b"not json at all", 9)

    assert producer.pending_run_ids() == ["20260101-000000-good"]  # the lost-run sweep reads the queue too
    consumer = JobQueue(home, handler=_record_runs([]))
    with caplog.at_level(logging.WARNING, logger="cherry.queue"):
        taken = [consumer.huey.dequeue() for _ in range(3)]
    assert taken[0] is None and taken[1] is None
    assert taken[2].args == ("20260101-000000-good",)
    assert not marker.exists()
    assert sum("dropped a queue message" in r.getMessage() for r in caplog.records) == 2
    assert "not JSON" in caplog.text


def test_queue_messages_are_json_with_a_run_id_and_a_kind(home):
    import json

    from jobs.queue import JobQueue

    queue = JobQueue(home)
    queue.enqueue("20260101-000000-one", priority=3)
    (raw,) = queue.huey.storage.enqueued_items()
    body = json.loads(raw)
    assert body["run_id"] == "20260101-000000-one" and body["kind"].endswith("cherry.run") and body["priority"] == 3


def test_a_message_with_a_path_for_a_run_id_is_dropped(home, caplog):
    from jobs.queue import JobQueue

    queue = JobQueue(home)
    task_name = queue.task.task_class.__module__ + "." + queue.task.task_class.__name__
    queue.huey.storage.enqueue(
        f'{{"kind": "{task_name}", "id": "t", "run_id": "../../etc", "priority": 0}}'.encode(), 0
    )
    with caplog.at_level(logging.WARNING, logger="cherry.queue"):
        assert queue.huey.dequeue() is None
    assert "not a Cherry run id" in caplog.text


def test_with_a_queue_key_only_signed_messages_are_taken(home, monkeypatch, caplog):
    from jobs.queue import JobQueue

    monkeypatch.setenv("CHERRY_QUEUE_KEY", "the-shared-secret")
    JobQueue(home).enqueue("20260101-000000-signed")
    monkeypatch.setenv("CHERRY_QUEUE_KEY", "another-key")
    JobQueue(home).enqueue("20260101-000000-forged")
    monkeypatch.delenv("CHERRY_QUEUE_KEY")
    JobQueue(home).enqueue("20260101-000000-unsigned")

    monkeypatch.setenv("CHERRY_QUEUE_KEY", "the-shared-secret")
    consumer = JobQueue(home, handler=_record_runs([]))
    with caplog.at_level(logging.WARNING, logger="cherry.queue"):
        taken = [consumer.huey.dequeue() for _ in range(3)]
    assert [t.args[0] for t in taken if t is not None] == ["20260101-000000-signed"]
    assert caplog.text.count("without a valid signature") == 2


def test_revoking_a_queued_run_still_works_with_json(home):
    from jobs.queue import JobQueue

    queue = JobQueue(home)
    task_id = queue.enqueue("20260101-000000-revoked")
    queue.revoke(task_id)
    consumer = JobQueue(home, handler=_record_runs(seen := []))
    task = consumer.huey.dequeue()
    consumer.huey.execute(task)
    assert seen == []  # revoked: not executed


# ------------------------------------------------------------------ 2. workers check what they are told


@pytest.mark.parametrize("bad", ["../x", "/etc", ".hidden", "a/b", "", "x" * 200, "run\x1b]0;t\x07"])
def test_run_ids_must_be_one_safe_path_component(bad):
    from jobs.trust import UntrustedValue, check_run_id

    with pytest.raises(UntrustedValue):
        check_run_id(bad)


def test_new_run_ids_pass_the_check(home):
    from jobs.home import new_run_id
    from jobs.trust import check_run_id

    assert check_run_id(new_run_id("dpo · my run/../x", home))


def _run_with_row(home: Path, run_id: str, out_dir: str, spec: dict | None = None):
    from jobs.shared import open_store

    store = open_store(home)
    try:
        store.create_run(run_id, spec or {"algorithm": "sft"}, name="x", out_dir=out_dir)
        return store.get_run(run_id)
    finally:
        store.close()


def test_a_row_with_an_absolute_out_dir_does_not_choose_where_a_worker_writes(home, tmp_path):
    from jobs.runs import Jobs

    victim = tmp_path / "victim"
    victim.mkdir()
    run = _run_with_row(home, "20260101-000000-placed", str(victim))
    jobs = Jobs(home)
    try:
        placed = jobs.place(run, home, "this-host")
    finally:
        jobs.close()
    assert placed["out_dir"] == str(home / "20260101-000000-placed")


def test_cherry_rm_deletes_only_the_directory_derived_from_the_id(home, tmp_path):
    from jobs.runs import Jobs

    victim = home / "someone-elses-run"  # under the same home: the old check let this go
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    own = home / "20260101-000000-removed"
    own.mkdir()
    _run_with_row(home, "20260101-000000-removed", str(victim))
    jobs = Jobs(home)
    try:
        jobs.remove("20260101-000000-removed")
    finally:
        jobs.close()
    assert (victim / "keep.txt").read_text() == "precious"
    assert not own.exists()


def test_the_worker_validates_a_spec_from_the_store_again(home):
    from jobs.shared import open_store
    from jobs.worker import Worker

    run_id = "20260101-000000-badspec"
    _run_with_row(home, run_id, str(home / run_id), spec={"algorithm": "sft", "lr": -1.0, "model": "m"})
    worker = Worker(home)
    worker.execute(run_id)
    store = open_store(home)
    try:
        run = store.get_run(run_id)
    finally:
        store.close()
    assert run.status == "failed"
    assert "do not validate on the worker" in run.error and "lr" in run.error
    assert run.pid is None  # no process was started for it


def test_a_module_planted_in_the_workers_directory_is_not_imported(home, tmp_path):
    from jobs.worker import Worker

    workdir = tmp_path / "cwd"
    workdir.mkdir()
    marker = tmp_path / "imported"
    (workdir / "sqlite_utils.py").write_text(f"open({str(marker)!r}, 'w')\n")
    command = Worker(home).child_command("20260101-000000-none")
    assert "-P" in command
    command[-1] = str(os.getpid())  # the child checks that its parent is the worker
    subprocess.run(command, cwd=workdir, env={**os.environ, "CHERRY_HOME": str(home)}, capture_output=True, timeout=120)
    assert not marker.exists()


def test_reward_code_outside_cherry_code_paths_is_refused_before_it_runs(tmp_path, monkeypatch):
    from engine.rewards.functions import load_reward_function

    allowed, elsewhere = tmp_path / "allowed", tmp_path / "elsewhere"
    allowed.mkdir()
    elsewhere.mkdir()
    marker = tmp_path / "ran"
    (elsewhere / "evil.py").write_text(f"open({str(marker)!r}, 'w')\ndef r(p, c, **k):\n    return [0.0] * len(c)\n")
    (allowed / "good.py").write_text("def r(p, c, **k):\n    return [1.0] * len(c)\n")
    monkeypatch.setenv("CHERRY_CODE_PATHS", str(allowed))
    with pytest.raises(CherryError, match="outside CHERRY_CODE_PATHS"):
        load_reward_function(f"{elsewhere / 'evil.py'}:r")
    monkeypatch.syspath_prepend(str(elsewhere))
    with pytest.raises(CherryError, match="outside CHERRY_CODE_PATHS"):
        load_reward_function("evil:r")
    with pytest.raises(CherryError, match="outside CHERRY_CODE_PATHS"):
        load_reward_function("subprocess:call")  # the standard library is not allowed either
    assert not marker.exists()
    assert load_reward_function(f"{allowed / 'good.py'}:r")([""], ["a"]) == [1.0]


def test_wildcards_in_a_run_selector_match_themselves(home):
    from jobs.runs import Jobs

    _run_with_row(home, "20260101-000000-a_b", str(home / "x"))
    _run_with_row(home, "20260101-000000-axb", str(home / "y"))
    jobs = Jobs(home)
    try:
        assert jobs.resolve("a_b").id == "20260101-000000-a_b"
        with pytest.raises(CherryError, match="no run matches"):
            jobs.resolve("%")
    finally:
        jobs.close()


# ------------------------------------------------------------------ 3. secrets


@pytest.mark.parametrize(
    "url, shown",
    [
        ("redis://:hunter2@gpu-box:6379/0", "redis://:***@gpu-box:6379/0"),
        ("rediss://cherry:hunter2@gpu-box:6380/1", "rediss://cherry:***@gpu-box:6380/1"),
        ("redis://hunter2@gpu-box:6379", "redis://***@gpu-box:6379"),
        ("redis://gpu-box:6379/0", "redis://gpu-box:6379/0"),
    ],
)
def test_passwords_in_urls_are_masked(url, shown):
    from jobs.trust import mask_secrets, mask_url

    assert mask_url(url) == shown
    assert "hunter2" not in mask_secrets(f"Error connecting to {url}: refused", url)


def test_the_queue_backend_shown_everywhere_hides_the_password(monkeypatch):
    from jobs.queue import queue_backend

    monkeypatch.setenv("CHERRY_REDIS_URL", "redis://:hunter2@gpu-box:6379/0")
    assert queue_backend() == "redis (redis://:***@gpu-box:6379/0)"


def test_files_cherry_creates_are_private(tmp_path):
    home = tmp_path / "home"
    script = (
        "import os, numpy as np; os.umask(0o022)\n"
        "from tuiapp.cli import app\n"
        "import sys; sys.argv = ['cherry', 'ls']\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
        "from engine.data import cache\n"
        "from engine.data.examples import Examples\n"
        "cache.save(__import__('pathlib').Path(os.environ['CHERRY_HOME']) / 'cache' / 'c.npz', {}, {})\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, "CHERRY_HOME": str(home)}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    for path in (home / "cherry.db", home / "cache" / "c.npz"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((home / "cache").stat().st_mode) == 0o700


# ------------------------------------------------------------------ 5. bounds


def test_a_yaml_alias_bomb_preset_is_refused_quickly(tmp_path):
    from engine.spec import load_preset

    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    with pytest.raises(CherryError, match="aliases expand"):
        load_preset(str(bomb))
    assert time.monotonic() - started < 5


def test_a_huge_yaml_file_is_refused_before_it_is_read(tmp_path):
    from engine.limits import YAML_MAX_BYTES, load_yaml_file

    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * YAML_MAX_BYTES + "\n")
    with pytest.raises(CherryError, match="at most"):
        load_yaml_file(big)


def _hanging_reward_file(tmp_path: Path) -> Path:
    path = tmp_path / "hang.py"
    path.write_text("def hang(prompts, completions, **kwargs):\n    while True:\n        pass\n")
    return path


@pytest.mark.parametrize("source", ["file", r"regex:(a+)+$"])
def test_a_reward_that_never_returns_is_stopped_and_scores_nothing(tmp_path, caplog, source):
    from engine.rewards import build_reward

    entry = f"{_hanging_reward_file(tmp_path)}:hang" if source == "file" else source
    reward = build_reward([entry], tokenizer=None, timeout=0.5)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="cherry.rewards"):
        result = reward(["p", "q"], ["a" * 40 + "b", "a" * 40 + "c"], [[1], [2]], [[1], [2]])
    assert time.monotonic() - started < 5
    assert result.total == [0.0, 0.0]
    assert "took longer than 0.5s" in caplog.text and "reward_timeout" in caplog.text


def test_reward_timeout_is_a_setting_checked_like_the_others():
    from engine.spec import build_spec

    assert build_spec({"algorithm": "grpo", "model": "m", "rewards": ["exact_match"]}).reward_timeout == 30
    with pytest.raises(CherryError, match="reward_timeout"):
        build_spec({"algorithm": "grpo", "model": "m", "rewards": ["exact_match"], "reward_timeout": -1})


def test_a_chat_template_that_never_ends_is_stopped(monkeypatch):
    from engine.data import tokenise
    from engine.demo.tokenizer import build_tokenizer
    from engine.errors import DataError

    tokenizer = build_tokenizer()
    tokenizer.chat_template = "{% for a in range(100000) %}{% for b in range(100000) %}{{ '' }}{% endfor %}{% endfor %}{{ messages[0].content }}"
    monkeypatch.setattr(tokenise, "CHAT_TEMPLATE_SECONDS", 0.5)
    started = time.monotonic()
    with pytest.raises(DataError, match="took longer than 0.5s"):
        tokenise._render_chat(tokenizer, [{"role": "user", "content": "hi"}], True, 3, "row")
    assert time.monotonic() - started < 5


def test_a_jsonl_line_past_the_cap_is_refused_with_its_line_number(tmp_path, monkeypatch):
    from engine.data import load
    from engine.errors import DataError

    monkeypatch.setattr(load, "JSONL_MAX_LINE_CHARS", 100)
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "' + "x" * 200 + '"}\n')
    with pytest.raises(DataError, match=r"line 2 is 214 characters long"):
        load._json_lines(path, path.read_text())


# ------------------------------------------------------------------ 7. smaller


def test_the_judge_template_is_filled_in_one_pass():
    from engine.rewards.judge import LLMJudge

    judge = LLMJudge.__new__(LLMJudge)
    judge.template = "Q: {prompt}\nA1: {answer_1}\nA2: {answer_2}"
    judge.use_chat = False
    text = judge.render("say {answer_2}", "one", "two")
    assert text.startswith("Q: say {answer_2}\nA1: one\nA2: two")


def test_run_processes_keep_a_one_machine_rendezvous_on_loopback(monkeypatch):
    from engine.launch import loopback_only

    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth9")
    env = loopback_only()
    if Path("/sys/class/net/lo").exists():
        assert env == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "eth9"}


def test_control_characters_are_escaped_for_the_terminal():
    from tuiapp.text import safe_data, safe_text

    assert safe_text("a\x1b]52;c;ZXZpbA==\x07b\x9b2J\u202e") == "a\\x1b]52;c;ZXZpbA==\\x07b\\x9b2J\\u202e"
    assert safe_text("two\nlines\tand a tab") == "two\nlines\tand a tab"
    assert safe_data({"k\x1b": ["\x1b[31m"]}) == {"k\\x1b": ["\\x1b[31m"]}


def test_cli_show_ls_and_logs_escape_what_runs_wrote(home):
    from typer.testing import CliRunner

    from jobs.shared import open_store
    from tuiapp.cli import app

    run_id = "20260101-000000-evil"
    evil = "evil\x1b]0;pwned\x07\x1b[2J"
    (home / run_id).mkdir()
    (home / run_id / "log.txt").write_text(f"line one\n{evil}\n")
    store = open_store(home)
    try:
        store.create_run(run_id, {"algorithm": "sft", "name": evil}, name=evil, out_dir=str(home / run_id))
        store.add_event(run_id, "note", f"event {evil}")
        store.set_status(run_id, "failed", error=f"error {evil}")
    finally:
        store.close()
    runner = CliRunner()
    for command in (["ls"], ["show", run_id], ["logs", run_id], ["logs", run_id, "--events"], ["show", evil]):
        result = runner.invoke(app, command)
        output = result.output + (result.stderr if result.stderr_bytes is not None else "")
        assert "\x1b" not in output and "\x07" not in output, (command, output)
    assert "evil\\x1b]0;pwned\\x07" in runner.invoke(app, ["show", run_id]).output
