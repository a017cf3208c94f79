"""The engine's numbers do not move when its code is reorganised.

Five short demo runs (DPO, KTO, SFT, GRPO, PPO) are compared step by step with metrics recorded
from an earlier engine (tests/golden/). Any change to the order random numbers are drawn in, to a
loss, to accumulation or to evaluation shows up here. A change that is *meant* to change the
numbers regenerates the files on purpose:

    CHERRY_WRITE_GOLDEN=1 python -m pytest tests/e2e/test_metric_equality.py

and says why in its commit.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
# Short runs that still pass through every part of a loop: eval at the start, in the middle and at
# the end, sample comparisons, a KL estimate, a checkpoint.
SHORT = [
    "num_threads=1",
    "max_steps=4",
    "eval_steps=2",
    "sample_steps=2",
    "save_steps=2",
    "eval_max_examples=16",
    "num_samples=4",
    "kl_samples=4",
    "max_rows=256",
]
RUNS = {
    "dpo": [],
    "kto": [],
    "sft": [],
    "grpo": ["batch_size=4", "num_generations=4"],
    "ppo": ["batch_size=8"],
}
# Wall-clock and machine readings differ between any two runs; everything else must not.
VOLATILE = ("time/", "sys/", "tokens_per_s", "gen/seconds", "gen/samples_per_s", "gen/tokens_per_s")


def _numbers(metrics_file: Path) -> list[dict]:
    rows = []
    for line in metrics_file.read_text().splitlines():
        row = json.loads(line)
        step = row.pop("step")
        row.pop("time", None)
        kept = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not any(p in k for p in VOLATILE)}
        rows.append({"step": step, "values": kept})
    return rows


@pytest.mark.parametrize("method", sorted(RUNS))
def test_demo_metrics_equal_the_recorded_ones(method, tmp_path):
    from engine.spec import resolve_spec
    from engine.train import train

    spec = resolve_spec(f"demo/{method}", SHORT + RUNS[method])
    train(spec, tmp_path / method)
    got = _numbers(tmp_path / method / "metrics.jsonl")
    golden_file = GOLDEN / f"{method}.json"
    if os.environ.get("CHERRY_WRITE_GOLDEN"):
        golden_file.write_text(json.dumps(got, indent=1) + "\n")
    expected = json.loads(golden_file.read_text())
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for mine, theirs in zip(got, expected):
        assert sorted(mine["values"]) == sorted(theirs["values"]), f"step {mine['step']}: metric names differ"
        for name, value in theirs["values"].items():
            # Tight enough that any real change fails; loose enough for another CPU's kernels.
            assert math.isclose(mine["values"][name], value, rel_tol=1e-4, abs_tol=1e-6), (
                f"step {mine['step']} {name}: {mine['values'][name]} != recorded {value}"
            )
