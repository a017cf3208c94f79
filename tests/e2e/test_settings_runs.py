"""Settings in the field's language, end to end: a TRL config file trains, a chat template is given, eval is off."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from engine.reporting import MemoryReporter
from engine.spec import resolve_spec
from engine.train import train
from tests.conftest import write_jsonl
from tuiapp.cli import app


def test_a_trl_shaped_dpo_config_trains_the_demo(tmp_path, home):
    config = tmp_path / "dpo_config.yaml"
    config.write_text(
        "# as TRL's DPO script reads it\n"
        "model_name_or_path: demo\n"
        "dataset_name: demo/pairs.jsonl\n"
        "learning_rate: 3.0e-5\n"
        "per_device_train_batch_size: 8\n"
        "gradient_accumulation_steps: 2\n"
        "max_steps: 3\n"
        "beta: 0.1\n"
        "loss_type: sigmoid\n"
        "logging_steps: 1\n"
        "eval_strategy: 'no'\n"
        "bf16: false\n"
        f"output_dir: {tmp_path / 'dpo-out'}\n"
        "push_to_hub: false\n"
        "report_to: none\n"
    )
    result = CliRunner().invoke(
        app, ["train", "--preset", "dpo", "--config", str(config), "--set", "max_rows=64", "--set", "num_threads=1"]
    )
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "dpo-out"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 3
    spec = (run_dir / "spec.yaml").read_text()
    assert "lr: 3.0e-05" in spec and "grad_accum: 2" in spec and "dtype: fp32" in spec
    events = (run_dir / "events.jsonl").read_text()
    assert "learning_rate -> lr" in events and "per_device_train_batch_size -> batch_size" in events
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not any(key.startswith("eval/") for row in metrics for key in row)  # eval_strategy: no
    assert [row["step"] for row in metrics if "train/loss" in row] == [1, 2, 3]


def test_a_tokenizer_without_a_template_trains_conversational_data_with_chatml(tiny_model_dir, tmp_path):
    model = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, model)
    for name in ("chat_template.jinja",):
        (model / name).unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    rows = [
        {"messages": [{"role": "user", "content": f"say {c}"}, {"role": "assistant", "content": c * 3}]}
        for c in "abcdefgh" * 3
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    common = ["max_steps=2", "batch_size=4", "eval_split=0.2", "num_threads=1", "max_new_tokens=4", "num_samples=1"]
    without = resolve_spec("sft", common, model=str(model), dataset=str(data))
    try:
        train(without, tmp_path / "run-without", MemoryReporter())
        raise AssertionError("conversational data trained with no chat template")
    except Exception as err:  # the message says how to give one
        assert "chat_template=chatml" in str(err)
    spec = resolve_spec("sft", [*common, "chat_template=chatml"], model=str(model), dataset=str(data))
    summary = train(spec, tmp_path / "run", MemoryReporter())
    assert summary["status"] == "completed"
    saved = (tmp_path / "run" / "final" / "chat_template.jinja").read_text()
    assert "<|im_start|>" in saved  # the final model's tokenizer carries the template it trained with
