"""`cherry bench METHOD --against trl`: both sides train the same case in fresh processes and agree on
the first step's loss; the harness's own pieces (the case, the Cherry side, the table, the ablations)
are checked without TRL."""

from __future__ import annotations

import json
from dataclasses import replace
from importlib.util import find_spec

import pytest
from typer.testing import CliRunner

from benchmarks.training.against import (
    LOSS_TOLERANCE,
    METHODS,
    SHAPES,
    Case,
    build_rows,
    compare_in_one_process_per_side,
    report_lines,
    row_lengths,
    run_side,
    write_case,
)
from engine.registry import is_online
from tuiapp.cli import app as cli

# One worker runs them all: `tiny_results` (both sides' child processes, all five methods) is then built once.
pytestmark = pytest.mark.xdist_group("bench_trl")

needs_trl = pytest.mark.skipif(
    find_spec("trl") is None, reason='TRL is not installed (pip install -e ".[bench]"): the comparison needs it'
)


@pytest.fixture(scope="module")
def tiny_results():
    """All five methods at the tiny shape, one child process per side (libraries imported once per side)."""
    results = compare_in_one_process_per_side(list(METHODS), "tiny", steps=2, warmup=1)
    return {result["method"]: result for result in results}


@needs_trl
@pytest.mark.parametrize("method", METHODS)
def test_tiny_shape_against_trl(method, tiny_results):
    result = tiny_results[method]
    cherry, trl = result["cherry"], result["trl"]
    rate = "completions_per_s" if is_online(method) else "tokens_per_s"
    for side in (cherry, trl):
        assert side["timed_steps"] == 2, side
        assert side[rate] > 0 and side["step_seconds"] > 0, side
        assert side["first_loss"] is not None
    assert result["speed_ratio"] > 0 and result["memory_ratio"] > 0
    if is_online(method):
        for side in (cherry, trl):  # sampling and the rest of the step are timed apart on both sides
            assert 0 < side["rollout_seconds"] < side["step_seconds"], side
    else:
        # the same tokens (KTO: with its mismatched KL rows), and the same objective on them
        assert cherry["tokens_per_step"] == trl["tokens_per_step"] > 0
        assert result["losses_agree"], (cherry["first_loss"], trl["first_loss"])
        assert abs(cherry["first_loss"] - trl["first_loss"]) <= LOSS_TOLERANCE
    text = "\n".join(report_lines(result))
    assert "Cherry/TRL" in text and "cherry" in text and "trl" in text


def test_the_first_step_loss_is_not_a_constant(tmp_path):
    """With the reference a different random model, the Cherry side's first DPO loss is not ln 2: agreeing
    on it shows that both sides scored the same tokens, not merely that every log-ratio was 0."""
    case = Case(method="dpo", shape="tiny", dir=str(tmp_path), steps=1, warmup=0, max_length=48)
    write_case(case)
    [result] = run_side("cherry", [case])
    assert result["tokens_per_s"] > 0 and result["timed_steps"] == 1 and result["peak_mem_gb"] >= 0
    assert abs(result["first_loss"] - 0.693147) > 1e-3, result["first_loss"]
    rows = [json.loads(line) for line in (tmp_path / "data.jsonl").read_text().splitlines()]
    assert rows == build_rows(case) and len(rows) == 4
    assert all(len(r["prompt"]) == 24 and len(r["chosen"]) == len(r["rejected"]) == 8 for r in rows)


def test_kto_rows_share_one_prompt(tmp_path):
    rows = build_rows(Case(method="kto", shape="tiny", dir=str(tmp_path)))
    assert len({r["prompt"] for r in rows}) == 1 and len({r["completion"] for r in rows}) == len(rows)
    assert {r["label"] for r in rows} == {True, False}


def test_report_names_a_disagreement():
    side = {"tokens_per_s": 100.0, "step_seconds": 1.0, "peak_mem_gb": 1.0, "first_loss": 0.5, "memory": "RSS"}
    result = {
        "method": "dpo",
        "shape": "tiny",
        "about": "x",
        "case": {"new_tokens": 0, "device": "cpu", "threads": 1, "steps": 2, "warmup": 1},
        "cherry": side,
        "trl": {**side, "first_loss": 0.6},
        "rate": "tokens_per_s",
        "speed_ratio": 1.0,
        "memory_ratio": 1.0,
        "loss_abs_diff": 0.1,
        "losses_agree": False,
    }
    assert "DISAGREE" in report_lines(result)[-1]
    assert "agree:" in report_lines({**result, "loss_abs_diff": 0.0, "losses_agree": True})[-1]


def test_varied_lengths_rows_vary_tenfold_and_the_report_gives_packed_over_padded(tmp_path):
    lengths = row_lengths(SHAPES["varied-lengths"])
    totals = sorted(p + c for p, c in lengths)
    assert len(lengths) == 8 and totals[-1] == 256 and totals[0] <= 26 and len(set(totals)) == 8
    rows = build_rows(Case(method="sft", shape="varied-lengths", dir=str(tmp_path)))
    assert [(len(r["prompt"]), len(r["completion"])) for r in rows] == lengths
    side = {"tokens_per_s": 200.0, "step_seconds": 1.0, "peak_mem_gb": 1.0, "first_loss": 0.5, "memory": "RSS"}
    result = {
        "method": "sft",
        "shape": "varied-lengths",
        "about": "x",
        "case": {"new_tokens": 0, "device": "cpu", "threads": 1, "steps": 2, "warmup": 1},
        "cherry": side,
        "cherry_padded": {**side, "tokens_per_s": 100.0},
        "trl": side,
        "rate": "tokens_per_s",
        "speed_ratio": 1.0,
        "memory_ratio": 1.0,
        "loss_abs_diff": 0.0,
        "losses_agree": True,
        "packing_ratio": 2.0,
    }
    text = report_lines(result)
    assert any(line.startswith("cherry_padded") for line in text) and "packed/padded: 2.00x" in text[-1]


def test_without_trl_the_command_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(
        "benchmarks.training.against.trl_missing", lambda: 'TRL is not installed: pip install -e ".[bench]"'
    )
    result = CliRunner().invoke(cli, ["bench", "kto", "--shape", "tiny"])
    assert result.exit_code == 2
    assert "[bench]" in result.output and "nothing was measured" in result.output and "Traceback" not in result.output
    bad = CliRunner().invoke(cli, ["bench", "sft", "--against", "ablation"])
    assert bad.exit_code == 2 and "--against must be trl" in bad.output
    shape = CliRunner().invoke(cli, ["bench", "dpo", "--shape", "huge"])
    assert shape.exit_code == 2 and "--shape must be one of" in shape.output


def test_dpo_ablation_is_labelled_as_one(monkeypatch):
    args = ["bench", "dpo", "--against", "ablation", "--seq-len", "32", "--prompt-len", "24", "--vocab", "512"]
    args += ["--hidden", "32", "--layers", "1", "--steps", "1", "--threads", "1", "--device", "cpu"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "Ablation (not a comparison with another tool)" in result.output
    assert "speed-up" not in result.output and "naive" not in result.output


def test_grpo_ablation_times_the_rollout_and_both_updates():
    from benchmarks.training.grpo import GRPOBenchConfig, run

    cfg = replace(GRPOBenchConfig(), prompts=2, k=2, prompt_len=8, max_new_tokens=4, vocab=512, hidden=32, layers=1)
    result = run(replace(cfg, repeats=1, threads=1, device="cpu"))
    assert result["rollout"]["samples_per_s"] > 0
    assert result["update_completion_only"]["tokens_per_s"] > 0 and result["update_full_logits"]["tokens_per_s"] > 0
    assert "rollout_speedup" not in result and result["update_ratio"] > 0
