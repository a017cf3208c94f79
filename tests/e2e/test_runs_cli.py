"""The run-reading commands (ls, show, metrics, samples, logs, cancel) on a store written directly."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from jobs.home import store_path
from jobs.store import Store, StoreReporter
from tuiapp.cli import app


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CHERRY_HOME", str(tmp_path))
    store = Store(store_path(tmp_path))
    store.create_run(
        "20261121-100000-dpo-demo", {"algorithm": "dpo", "beta": 0.1}, name="dpo-demo", out_dir=str(tmp_path / "r1")
    )
    store.set_status("20261121-100000-dpo-demo", "running")
    reporter = StoreReporter(store, "20261121-100000-dpo-demo")
    reporter.log_event("start", "dpo: 4 steps", total_steps=4)
    for step in range(1, 4):
        reporter.log_metrics(step, {"train/loss": 0.7 - 0.1 * step, "rewards/margin": 0.2 * step})
    reporter.log_metrics(3, {"eval/exact_match": 0.5})
    reporter.log_samples(
        3,
        [
            {
                "prompt": "1+1=",
                "reference": "3",
                "policy": "2",
                "answer": "2",
                "reference_score": 0.0,
                "policy_score": 1.0,
            }
        ],
    )
    store.create_run("20261121-100001-kto-demo", {"algorithm": "kto"}, name="kto-demo", out_dir=str(tmp_path / "r2"))
    return tmp_path


def run(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_ls_shows_progress_and_the_key_metric(home):
    code, out = run("ls")
    assert code == 0
    line = next(text for text in out.splitlines() if "dpo-demo" in text)
    assert "running" in line and "3/4" in line and "exact_match 0.500" in line
    code, out = run("ls", "--status", "queued", "--json")
    assert [r["name"] for r in json.loads(out)] == ["kto-demo"]
    code, out = run("ls", "--status", "bogus")
    assert code == 2 and "unknown status" in out


def test_metrics_prints_one_row_per_step_or_json_lines(home):
    code, out = run("metrics", "dpo-demo")
    assert code == 0
    lines = out.splitlines()
    assert "train/loss" in lines[0] and "eval/exact_match" in "\n".join(lines)
    rows = [text.split() for text in lines if text.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2", "3"] and rows[-1][-1] == "0.5"  # a step's train and eval on one line
    code, out = run("metrics", "dpo-demo", "--json", "--names", "train/loss")
    assert [json.loads(text) for text in out.splitlines()] == [
        {"step": s, "train/loss": pytest.approx(0.7 - 0.1 * s)} for s in (1, 2, 3)
    ]


def test_show_samples_and_ambiguous_names(home):
    code, out = run("show", "dpo")
    assert code == 0 and "running" in out and "train/loss" in out
    code, out = run("samples", "dpo")
    assert code == 0 and "'2' ✓" in out and "'3' ✗" in out
    code, out = run("show", "demo")
    assert code == 2 and "matches 2 runs" in out
    code, out = run("show", "nothing-like-this")
    assert code == 2 and "no run matches" in out


def test_samples_show_preference_pairs_with_rewards_and_margin(home):
    """Rows of kind preference (chosen vs rejected, the method's reward of each) print beside the
    reference vs policy rows; unpaired (KTO) rows with their label; --json keeps every field."""
    store = Store(store_path(home))
    reporter = StoreReporter(store, "20261121-100000-dpo-demo")
    reporter.log_samples(
        3,
        [
            {
                "kind": "preference",
                "prompt": "2+2=",
                "chosen": "4",
                "rejected": "5",
                "chosen_reward": 0.25,
                "rejected_reward": -0.5,
                "margin": 0.75,
            },
            {
                "kind": "preference",
                "prompt": "3+3=",
                "chosen": "6",
                "rejected": "9",
                "chosen_reward": -0.1,
                "rejected_reward": 0.1,
                "margin": -0.2,
            },
            {"kind": "unpaired", "prompt": "4+4=", "completion": "8", "label": True, "reward": 0.3},
        ],
    )
    store.close()
    code, out = run("samples", "dpo")
    assert code == 0 and "'2' ✓" in out  # the reference vs policy row is still there
    assert "chosen ahead on 1/2, mean margin +0.275" in out
    assert "chosen    '4'   reward +0.25" in out and "rejected  '5'   reward -0.5" in out
    assert "margin    +0.75 ✓" in out and "margin    -0.2 ✗" in out
    assert "completion '8'   desirable   reward +0.3" in out
    code, out = run("samples", "dpo", "--json")
    rows = json.loads(out)
    assert [r.get("kind") for r in rows] == [None, "preference", "preference", "unpaired"]
    assert rows[1] == {
        "step": 3,
        "prompt": "2+2=",
        "kind": "preference",
        "chosen": "4",
        "rejected": "5",
        "chosen_reward": 0.25,
        "rejected_reward": -0.5,
        "margin": 0.75,
    }


def test_cancel_of_a_running_run_is_a_request(home):
    code, out = run("cancel", "dpo-demo")
    assert code == 0 and "next step" in out
    assert Store(store_path(home)).get_run("20261121-100000-dpo-demo").cancel_requested == 1


def test_tags_notes_and_experiments_show_and_filter(home):
    store = Store(store_path(home))
    store.create_run(
        "20261121-100002-dpo-sweep",
        {"algorithm": "dpo"},
        name="dpo-sweep",
        out_dir=None,
        experiment="lr-scan",
        swept={"lr": "1e-6"},
    )
    code, out = run("tag", "dpo-demo", "good", "baseline")
    assert code == 0 and "baseline, good" in out
    code, out = run("tag", "kto-demo", "good")
    assert run("untag", "dpo-demo", "baseline")[0] == 0
    code, out = run("note", "dpo-demo", "lr too high after step 3")
    assert code == 0 and "note saved" in out
    code, out = run("ls", "--tag", "good", "--json")
    assert [r["name"] for r in json.loads(out)] == ["dpo-demo", "kto-demo"]
    assert json.loads(out)[0]["tags"] == ["good"] and json.loads(out)[0]["note"] == "lr too high after step 3"
    code, out = run("ls", "--experiment", "lr-scan")
    assert code == 0 and "dpo-sweep" in out and "dpo-demo" not in out and "[lr-scan] lr=1e-6" in out
    code, out = run("ls", "--experiment", "none-such")
    assert "with that filter" in out
    code, out = run("show", "dpo-demo")
    assert "note      lr too high after step 3" in out and "#good" in out
    code, out = run("show", "dpo-sweep", "--json")
    assert json.loads(out)["experiment"] == "lr-scan" and json.loads(out)["swept"] == {"lr": "1e-6"}
    code, out = run("tag", "dpo-demo", "two words")
    assert code == 2 and "a tag is one word" in out
