"""`cherry sweep` on the tiny model: points checked before anything is queued, dry runs, and a sweep
whose bad learning rate is pruned early by the median rule while a worker runs it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from jobs.runs import Jobs
from tests.e2e.test_jobs import start_worker, wait_for  # noqa: F401 (start_worker is a fixture)
from tuiapp.cli import app

TINY = [
    "--set", "batch_size=4", "--set", "sample_steps=0", "--set", "num_samples=0", "--set", "kl_samples=0",
    "--set", "logging_steps=1", "--set", "num_threads=1", "--set", "max_length=64",
    "--set", "max_prompt_length=32", "--set", "max_new_tokens=4", "--set", "eval_max_examples=8",
]  # fmt: skip


def cli(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_dry_run_prints_every_point_and_queues_nothing(home, tiny_model_dir, tiny_pairs):
    code, out = cli(
        "sweep", "--model", tiny_model_dir, "--dataset", tiny_pairs, *TINY,
        "--grid", "lr=5e-7,1e-6,2e-6", "--grid", "beta=0.1,0.3", "--name", "scan", "--dry-run",
    )  # fmt: skip
    assert code == 0, out
    lines = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(lines) == 6 and "lr=5e-7  beta=0.1" in lines[0] and "lr=2e-6  beta=0.3" in lines[-1]
    assert "experiment scan: 6 point(s), all valid; nothing queued" in out
    assert Jobs(home).store.list_runs() == []


def test_one_bad_point_refuses_the_whole_sweep_naming_the_field(home, tiny_model_dir, tiny_pairs):
    code, out = cli(
        "sweep", "--model", tiny_model_dir, "--dataset", tiny_pairs, *TINY, "--grid", "beta=0.1,-1",
    )  # fmt: skip
    assert code == 2
    assert "sweep point 2/2 (beta=-1)" in out and "beta" in out.split("(beta=-1)")[1] and "nothing was queued" in out
    assert Jobs(home).store.list_runs() == []
    assert len(Jobs(home).queue.pending_run_ids()) == 0


def test_a_random_sweep_file_queues_its_points_in_one_experiment(home, tiny_model_dir, tiny_pairs, tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        f"preset: dpo\nmodel: {tiny_model_dir}\ndataset: {tiny_pairs}\nname: drawn\n"
        "set: {max_steps: 2, eval_steps: 0}\nrandom: {count: 3, seed: 1, ranges: {lr: 'log(1e-7,1e-5)'}}\n"
    )
    code, out = cli("sweep", path)
    assert code == 0, out
    jobs = Jobs(home)
    runs = jobs.store.list_runs()
    assert len(runs) == 3 and {r.experiment for r in runs} == {"drawn"}
    assert [float(r.spec["lr"]) for r in runs] == [float(r.swept["lr"]) for r in runs]
    assert jobs.queue.pending_run_ids() == [r.id for r in runs]
    code, out = cli("ls", "--experiment", "drawn", "--json")
    assert len(json.loads(out)) == 3


def test_a_bad_learning_rate_is_pruned_early_and_can_resume(home, start_worker, tiny_model_dir, tiny_pairs):  # noqa: F811
    code, out = cli(
        "sweep", "--model", tiny_model_dir, "--dataset", tiny_pairs, *TINY,
        "--set", "max_steps=30", "--set", "eval_steps=3", "--set", "save_steps=100",
        "--grid", "lr=1e-3,1e-9", "--name", "prune-demo",
        "--prune", "median", "--prune-metric", "eval/loss", "--prune-after", "1",
    )  # fmt: skip
    assert code == 0, out
    jobs = Jobs(home)
    good, bad = jobs.store.list_runs()
    assert good.swept == {"lr": "1e-3"} and bad.swept == {"lr": "1e-9"}
    start_worker()  # one slot: the good run first, then the bad one is compared with it at each eval
    wait_for(lambda: jobs.store.get_run(bad.id).status in ("pruned", "completed", "failed"), 240, "the sweep to end")
    good, bad = jobs.store.get_run(good.id), jobs.store.get_run(bad.id)
    assert good.status == "completed" and good.step == 30
    assert bad.status == "pruned", bad.error
    assert bad.step < 30  # stopped soon after its first eval point past the start (step 3)
    reason = next(e["message"] for e in jobs.store.events(bad.id) if e["kind"] == "pruned")
    assert "eval/loss" in reason and "above the median" in reason
    assert sorted((Path(bad.out_dir) / "checkpoints").glob("step-*"))  # kept to resume from
    code, out = cli("ls", "--status", "pruned")
    assert bad.id in out and good.id not in out
    assert jobs.resume(bad.id).status == "queued"


def test_successive_halving_prunes_the_bad_learning_rate_at_its_first_rung(
    home,
    start_worker,  # noqa: F811
    tiny_model_dir,
    tiny_pairs,
):
    code, out = cli(
        "sweep", "--model", tiny_model_dir, "--dataset", tiny_pairs, *TINY,
        "--set", "max_steps=30", "--set", "eval_steps=3", "--set", "save_steps=100",
        "--grid", "lr=1e-3,1e-9", "--name", "halving-demo",
        "--prune", "halving", "--prune-metric", "eval/loss", "--prune-eta", "2", "--prune-rung", "3",
    )  # fmt: skip
    assert code == 0, out
    jobs = Jobs(home)
    good, bad = jobs.store.list_runs()
    assert bad.prune == {
        "rule": "halving", "metric": "eval/loss", "after": 1, "mode": "min", "eta": 2, "rung": 3,
    }  # fmt: skip
    start_worker()  # one slot: the good run reaches every rung first; the bad one ranks last of 2 at rung 3
    wait_for(lambda: jobs.store.get_run(bad.id).status in ("pruned", "completed", "failed"), 240, "the sweep to end")
    good, bad = jobs.store.get_run(good.id), jobs.store.get_run(bad.id)
    assert good.status == "completed" and good.step == 30
    assert bad.status == "pruned", bad.error
    assert bad.step < 12  # rungs at 3, 6, 12, 24: stopped at its first (a stop check can lag a few steps)
    reason = next(e["message"] for e in jobs.store.events(bad.id) if e["kind"] == "pruned")
    # judged at the highest rung it had reached when the check ran: 3, or 6 on a loaded machine
    assert re.search(r"at rung step (3|6) ranks 2 of 2", reason) and "keeps the best 1" in reason, reason


def test_worker_flag_starts_a_background_worker_when_none_runs(home, tiny_model_dir, tiny_pairs, monkeypatch):
    import tuiapp.launch

    started = []
    monkeypatch.setattr(tuiapp.launch, "ensure_worker", lambda at: started.append(at) or 4242)
    code, out = cli(
        "sweep", "--model", tiny_model_dir, "--dataset", tiny_pairs, *TINY, "--grid", "beta=0.1,0.3", "--worker",
    )  # fmt: skip
    assert code == 0, out
    assert started == [home] and "started a worker in the background (pid 4242" in out
    assert len(Jobs(home).store.list_runs()) == 2
