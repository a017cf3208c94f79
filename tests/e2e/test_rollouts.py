"""The rollout store end to end: a 3-step GRPO demo run of 2 prompts x 4 samples keeps its 24 rollouts,
`datasets` loads them, `cherry rollouts` lists and exports them, and the exported pairs train a DPO run;
both runs' manifests, in `cherry show` and `cherry compare`."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from tuiapp.cli import app

QUICK = ["max_length=32", "max_prompt_length=24", "eval_strategy=no", "sample_steps=0", "num_threads=1"]


def settings(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def test_a_grpo_demo_runs_rollouts_are_listed_exported_and_train_dpo(tmp_path, home):
    # exact match rarely separates the demo model's 4 samples in 3 steps: a regex on the first letter does
    overrides = settings(
        "batch_size=2", "num_generations=4", "max_steps=3", "max_rows=16", "rewards=exact_match,regex:[a-m].*", *QUICK
    )
    run_dir = tmp_path / "grpo"
    runner = CliRunner()
    trained = runner.invoke(app, ["train", "--preset", "demo/grpo", "--out", str(run_dir), *overrides])
    assert trained.exit_code == 0, trained.output

    from datasets import load_dataset

    stored = load_dataset("json", data_files=str(run_dir / "rollouts" / "*.jsonl"), split="train")
    assert stored.num_rows == 24 and sorted(set(stored["step"])) == [1, 2, 3]
    assert set(stored["group"]) == {0, 1} and set(stored["sample"]) == {0, 1, 2, 3}

    listed = runner.invoke(app, ["rollouts", str(run_dir), "--json"])
    assert listed.exit_code == 0, listed.output
    records = json.loads(listed.output)
    assert len(records) == 24 and all(
        r["advantage"] is not None and set(r["rewards"]) == {"exact_match", "regex"} for r in records
    )
    assert all(r["messages"][-1] == {"role": "assistant", "content": r["completion"]} for r in records)  # chat data

    pairs = tmp_path / "pairs.jsonl"
    exported = runner.invoke(app, ["rollouts", str(run_dir), "--export", "pairs", "--out", str(pairs)])
    assert exported.exit_code == 0, exported.output
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert 1 <= len(rows) <= 6 and all(r["chosen"] != r["rejected"] for r in rows)

    dpo_dir = tmp_path / "dpo"
    trained = runner.invoke(
        app,
        ["train", "--preset", "dpo", "--model", "demo", "--dataset", str(pairs), "--out", str(dpo_dir),
         *settings("max_steps=2", "batch_size=2", "eval_split=0", *QUICK)],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    summary = json.loads((dpo_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 2
    assert summary["data"]["train"] == len(rows)

    # what produced each run: in its directory, `cherry show` and `cherry compare`
    manifest = json.loads((dpo_dir / "manifest.json").read_text())
    assert manifest["packages"]["torch"] and manifest["packages"]["transformers"]
    assert manifest["data"]["sources"][0]["fingerprint"] and manifest["data"]["rows"]["train"] == len(rows)
    assert (
        manifest["seed"] == 0 and manifest["device"]["device"] == "cpu" and manifest["precision"]["dtype"] == "float32"
    )
    shown = runner.invoke(app, ["show", "dpo"])
    assert shown.exit_code == 0 and f"({len(rows)} rows -> {len(rows)} train / 0 eval)" in shown.output, shown.output
    compared = runner.invoke(app, ["compare", "grpo", "dpo", "--json"])
    assert compared.exit_code == 0, compared.output
    differ = json.loads(compared.output)
    assert differ["settings"]["algorithm"] == ["grpo", "dpo"]
    assert "data.fingerprint" in differ["manifest"] and "packages.torch" not in differ["manifest"]


def test_rollouts_of_a_run_on_another_host_come_from_the_store_and_mistakes_get_one_line(home, tmp_path):
    from jobs.shared import open_store

    store = open_store(home)
    store.create_run("r1-abc", {"algorithm": "grpo", "model": "m", "dataset": "d"}, name="r1", out_dir=None)
    records = [
        {"step": 1, "group": g, "sample": i, "prompt": f"p{g}", "completion": f"c{i}", "reward": float(g * i),
         "advantage": None, "kl": None, "length": 2, "finish": "eos"}
        for g in (0, 1) for i in (0, 1)
    ]  # fmt: skip
    store._insert_rollouts("r1-abc", 1, json.dumps(records))  # what ingesting a streamed step leaves
    store.close()
    runner = CliRunner()
    listed = runner.invoke(app, ["rollouts", "r1", "--json", "--group", "1"])
    assert listed.exit_code == 0 and [r["reward"] for r in json.loads(listed.output)] == [0.0, 1.0], listed.output
    shown = runner.invoke(app, ["rollouts", "r1"])
    assert "step 1 group 0: 2 samples, reward 0.000..0.000 (zero variance: teaches nothing)" in shown.output
    assert "step 1 group 1: 2 samples, reward 0.000..1.000\n" in shown.output
    for args, message in (
        (["--export", "dpo", "--out", "x.jsonl"], "choose one of: pairs, sft"),
        (["--export", "pairs"], "--export needs --out FILE"),
        (["--export", "pairs", "--group", "0", "--out", str(tmp_path / "p.jsonl")], "no pairs rows in the 2 rollouts"),
    ):
        failed = runner.invoke(app, ["rollouts", "r1", *args])
        assert failed.exit_code == 2 and message in failed.output, failed.output
    assert not (tmp_path / "p.jsonl").exists()
