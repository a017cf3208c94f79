"""Adding a method takes four files (docs/architecture.md, "Adding an algorithm"): its class, its pure loss,
its preset and its registry row. This test adds a toy pair method that way, touching nothing else, and
trains it: every list of methods the run passes through (spec, settings, data, loop, form) comes from the row."""

from __future__ import annotations

import textwrap

from engine.registry import ALGORITHMS, AlgorithmInfo, is_online
from engine.reporting import MemoryReporter
from engine.spec import method_settings, resolve_spec
from engine.train import train


def test_a_toy_method_added_through_the_recipe_trains(tiny_model_dir, tiny_pairs, tmp_path, monkeypatch):
    # 1 + 2: the class and its pure loss (one module here, for the test's sake)
    (tmp_path / "toy_margin.py").write_text(
        textwrap.dedent(
            '''
            import torch

            from engine.algorithms.pairs import PairMethod


            def toy_margin_loss(chosen_logps, rejected_logps, margin):
                """max(0, margin - (log pi(y_w) - log pi(y_l))): push the chosen answer `margin` nats ahead."""
                gap = chosen_logps - rejected_logps
                return torch.relu(margin - gap), {"rewards/margin": gap.detach()}


            class ToyMargin(PairMethod):
                def pair_loss(self, out, pairs, batch):
                    return toy_margin_loss(out.sums[:pairs], out.sums[pairs:], self.spec.beta)
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    # 3: its preset, on the shared base
    preset = tmp_path / "toy_margin.yaml"
    preset.write_text(
        "description: a toy margin loss\nbase: _base\n"
        "algorithm: toy_margin\nbeta: 2.0       # the margin in nats\nlr: 5.0e-3\nbatch_size: 8\n"
    )
    # 4: its registry row
    row = AlgorithmInfo(
        "toy_margin",
        "a toy margin loss",
        "preference",
        False,
        "toy_margin:ToyMargin",
        "toy_margin:toy_margin_loss",
        settings=("group_by_length", "beta"),
        logs=("rewards/margin",),
    )
    monkeypatch.setitem(ALGORITHMS, "toy_margin", row)

    assert not is_online("toy_margin") and "beta" in method_settings("toy_margin")
    common = ["max_steps=10", "eval_split=0.2", "max_length=64", "max_prompt_length=32", "num_threads=1"]
    spec = resolve_spec(str(preset), [*common, "warmup_ratio=0"], model=str(tiny_model_dir), dataset=str(tiny_pairs))
    assert "beta" in spec.to_dict() and "label_smoothing" not in spec.to_dict()
    reporter = MemoryReporter()
    summary = train(spec, tmp_path / "run", reporter)
    assert summary["status"] == "completed"
    margins = reporter.series("rewards/margin")
    assert margins[-1] > margins[0]  # the toy loss pushed the chosen answers ahead
