"""`cherry demo --headless`: DPO from the demo model must raise held-out exact match by >= 10 points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tuiapp.cli import app

DEMO = Path(__file__).resolve().parents[2] / "presets" / "demo"


def test_headless_demo_raises_held_out_accuracy_by_ten_points(tmp_path):
    out = tmp_path / "demo-run"
    result = CliRunner().invoke(app, ["demo", "--headless", "--out", str(out), "--set", "num_threads=1"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["before"]["eval/exact_match"], summary["final"]["eval/exact_match"]
    assert after - before >= 0.10, (before, after)
    # The budget is 5 CPU-minutes; the demo uses a small fraction of it. This bound only
    # catches a demo preset that grew by an order of magnitude, it is not a speed target.
    assert summary["train_seconds"] < 300
    assert "held-out exact match: 47.5% before ->" in result.output
    assert result.output.count("reference ") >= 6 and "✓" in result.output  # side-by-side samples with marks
    assert "implicit reward on 32 held-out pairs: chosen ahead on" in result.output  # the preference rows beside them
    assert summary["final"]["rewards/accuracy"] > 0 and "kl/mean" in summary["final"]


def _built_with_other_versions() -> str | None:
    """Why a rebuild cannot match the committed demo bit for bit here, or None when it can: the model's
    random initialisation and sampling belong to the torch and transformers versions it was built with
    (presets/demo/info.json records them): measured, transformers 5.24 builds a different model from the
    same seed than 5.23 did (held-out accuracy 35% instead of 47.5%)."""
    import torch
    import transformers

    committed = json.loads((DEMO / "info.json").read_text())
    installed = {"torch": torch.__version__, "transformers": transformers.__version__}
    differ = [
        f"{name} {installed[name]} (built with {committed.get(name)})"
        for name in installed
        if installed[name] != committed.get(name)
    ]
    return ", ".join(differ) or None


@pytest.mark.slow
def test_demo_build_is_reproducible(tmp_path):
    """Rebuilding from the seed gives the committed data and the same held-out accuracy (~90 s), with the
    library versions the demo was built with."""
    from engine.demo.build import build_demo

    other = _built_with_other_versions()
    if other:
        pytest.skip(f"the committed demo was built with other library versions: {other}")
    info = build_demo(tmp_path / "demo", seed=0, log=lambda line: None)
    committed = json.loads((DEMO / "info.json").read_text())
    assert info["held_out_accuracy"] == committed["held_out_accuracy"]
    for name in ("sft.jsonl", "pairs.jsonl", "unpaired.jsonl", "prompts.jsonl", "eval.jsonl"):
        assert (tmp_path / "demo" / name).read_text() == (DEMO / name).read_text(), name


def test_chain_of_hindsight_is_judged_against_the_demo_model_on_plain_prompts():
    from tuiapp.cli.demo import _headline

    summary = {"algorithm": "coh", "before": {"eval/exact_match": 0.0}, "final": {"eval/exact_match": 0.58}}
    label, before, after = _headline(summary)
    assert before == 0.475 and after == 0.58 and "plain prompts" in label
    summary["algorithm"] = "dpo"
    assert _headline(summary)[1:] == (0.0, 0.58)


def test_a_demo_run_without_evaluation_has_no_headline_instead_of_a_traceback():
    from tuiapp.cli.demo import _headline

    # `--set eval_strategy=no`: the summary holds no before/after metrics
    assert _headline({"algorithm": "dpo", "before": {}, "final": {}, "wall_seconds": 3.0}) is None
    assert _headline({"algorithm": "dpo", "before": {"eval/exact_match": 0.4}, "final": {"eval/exact_match": 0.6}}) == (
        "held-out exact match",
        0.4,
        0.6,
    )
