"""Chain of Hindsight: sequence layout, loss masking, random block order, positive-phrase prompting."""

from __future__ import annotations

from engine.algorithms.coh import ChainOfHindsight
from engine.reporting import MemoryReporter
from engine.spec import build_spec
from engine.train import train


class _Tok:
    """Maps each character to its code point: enough to read the layout back."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_sequence_layout_masks_only_completions_and_randomises_block_order():
    spec = build_spec({"algorithm": "coh", "coh_positive": "+", "coh_negative": "-", "max_length": 64, "max_prompt_length": 32})
    algo = ChainOfHindsight(spec)
    examples = [{"index": i, "prompt_ids": [1, 2], "chosen_ids": [10, 0], "rejected_ids": [20, 0]} for i in range(40)]
    algo.prepare_examples(examples, _Tok())
    plus, minus = ord("+"), ord("-")
    good_first = [[1, 2, plus, 10, 0, minus, 20, 0], [0, 0, 0, 1, 1, 0, 1, 1]]
    bad_first = [[1, 2, minus, 20, 0, plus, 10, 0], [0, 0, 0, 1, 1, 0, 1, 1]]
    layouts = [[ex["coh_ids"], ex["coh_mask"]] for ex in examples]
    assert all(layout in (good_first, bad_first) for layout in layouts)
    assert 10 <= sum(layout == good_first for layout in layouts) <= 30  # both orders occur
    assert algo.generation_prompt([1, 2]) == [1, 2, plus]
    batch = algo.collate(examples[:2], pad_id=0)
    assert algo.units(batch) == 8  # 2 sequences x (2 + 2) completion tokens


def test_coh_trains_a_tiny_model(tiny_model_dir, tiny_pairs, tmp_path):
    spec = build_spec({"algorithm": "coh", "model": str(tiny_model_dir), "dataset": str(tiny_pairs), "lr": 5e-3,
                       "batch_size": 8, "max_steps": 15, "eval_steps": 0, "eval_split": 0.2, "warmup_ratio": 0.0,
                       "max_length": 64, "max_prompt_length": 32, "num_samples": 2, "max_new_tokens": 4, "num_threads": 1})
    reporter = MemoryReporter()
    summary = train(spec, tmp_path / "coh", reporter)
    assert summary["final"]["eval/loss"] < summary["before"]["eval/loss"]
    losses = reporter.series("train/loss")
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0]
    assert "kl/mean" not in summary["final"]  # no reference model
