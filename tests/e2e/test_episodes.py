"""Multi-turn GRPO end to end on the tiny model: a two-turn environment from a file, one that fails in every
way it can, and tools that raise, hang or are called forever; the stored rollouts and `cherry rollouts`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import engine.episodes as episodes
from engine.rollout_store import read_rollouts
from engine.spec import build_spec
from engine.train import train
from tests.conftest import write_jsonl
from tuiapp.cli import app

# A turn of the random tiny model rarely ends in EOS within a few tokens: any letter or digit ends it too.
STOPS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")

ENVIRONMENTS = '''
import time

class TwoTurns:
    """Asks twice; the second answer is rewarded when short. Misbehaves on purpose for some rows."""

    def reset(self, row):
        self.answer, self.turn = row["answer"], 0
        if self.answer == "hh":
            raise RuntimeError("reset broke")
        return [{"role": "user", "content": "say " + self.answer}]

    def step(self, text):
        self.turn += 1
        if self.answer == "ee":
            raise ValueError("the environment broke")
        if self.answer == "ff":
            time.sleep(30)
        if self.answer == "gg":
            return "not a tuple"
        if self.turn == 1:
            return [{"role": "user", "content": "again"}], 0.5, False
        return None, float(len(text) < 5), True
'''


def run_spec(model_dir, data, **overrides):
    values = dict(
        algorithm="grpo", model=str(model_dir), dataset=str(data), batch_size=4, num_generations=2,
        max_new_tokens=8, max_length=64, max_prompt_length=32, eval_split=0.0, max_steps=2, lr=1e-3,
        beta=0.05, eval_strategy="no", sample_steps=0, num_samples=0, kl_samples=0, logging_steps=1,
        num_threads=1, stop=STOPS, rewards=["environment"], tool_timeout=0.5,
    )  # fmt: skip
    values.update(overrides)
    return build_spec(values)


def test_a_two_turn_environment_trains_grpo_and_its_failures_are_recorded(tiny_model_dir, tmp_path, home):
    env = tmp_path / "env.py"
    env.write_text(ENVIRONMENTS)
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": c, "answer": c * 2} for c in "abcdefgh"])
    spec = run_spec(tiny_model_dir, data, environment=f"{env}:TwoTurns", max_turns=3)
    summary = train(spec, tmp_path / "run")
    assert summary["status"] == "completed" and summary["step"] == 2

    records = read_rollouts(tmp_path / "run")
    assert len(records) == 16
    by_answer = {}
    for record in records:
        by_answer.setdefault(record["answer"], []).append(record)
    healthy = [r for answer in "aabbccdd"[::2] for r in by_answer.get(answer * 2, [])]
    two_turns = [r for r in healthy if r["finish"] == "eos"]
    assert two_turns, [r["finish"] for r in healthy]
    for record in two_turns:  # both assistant turns, the environment's in between, all in the messages
        assert [t["role"] for t in record["turns"]] == ["assistant", "user", "assistant"]
        assert record["messages"] == [{"role": "user", "content": "say " + record["answer"]}, *record["turns"]]
        assert record["env_reward"] == record["reward"] == 0.5 + float(len(record["completion"]) < 5)
    broken = {"ee": "raised ValueError: the environment broke", "ff": "longer than 0.5s", "hh": "reset broke"}
    broken["gg"] = "must return (observation, reward, done)"
    for answer, message in broken.items():
        for record in by_answer.get(answer, []):
            if record["finish"] != "length":  # a first turn cut at max_new_tokens never reaches the environment
                assert record["finish"] == "error" and message in record["error"] and record["reward"] == 0.0
    assert any(r["finish"] == "error" for r in records)

    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stepped = [m for m in metrics if "tokens/env_fraction" in m]
    assert stepped and all(0 < m["tokens/env_fraction"] < 1 for m in stepped)

    shown = CliRunner().invoke(app, ["rollouts", str(tmp_path / "run"), "--limit", "0"])
    assert shown.exit_code == 0, shown.output
    assert 'user: "again"' in shown.output and "ended on: " in shown.output


def scripted_turns(monkeypatch):
    """The policy's turns scripted by the context: the tools' behaviour is what is tested, not the tiny model's.
    Prompts whose answer is 'zz' call tools forever; the others call both tools once, then answer."""
    call = (
        '<tool_call>{"name": "boom", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "sleepy", "arguments": {"seconds": 30}}</tool_call>'
    )

    def decode(self, prompts, k=1):
        out = []
        for ids in prompts:
            context = self.tokenizer.decode(ids)
            forever, answered = "zz" in context, "<|tool|>" in context
            text = call if forever or not answered else "42"
            out.append((self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos[0]], False))
        return out

    monkeypatch.setattr(episodes.Decoder, "__call__", decode)


def test_tools_that_raise_hang_or_are_called_forever_are_recorded_and_the_run_completes(
    tiny_model_dir, tmp_path, home, monkeypatch
):
    tools = tmp_path / "tools.py"
    tools.write_text(
        "import time\n\n"
        'def boom():\n    """Always fails."""\n    raise KeyError(\'no such key\')\n\n'
        'def sleepy(seconds: float):\n    """Sleeps."""\n    time.sleep(seconds)\n    return \'woke\'\n'
    )
    data = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": [{"role": "user", "content": p}], "answer": a} for p, a in (("20+22=", "42"), ("loop zz", "zz"))],
    )
    scripted_turns(monkeypatch)
    spec = run_spec(
        tiny_model_dir, data, batch_size=2, max_steps=1, rewards=["exact_match"],
        tools=[f"{tools}:boom", f"{tools}:sleepy"], max_turns=5, max_tool_calls=4,
    )  # fmt: skip
    summary = train(spec, tmp_path / "run")
    assert summary["status"] == "completed"
    records = read_rollouts(tmp_path / "run")
    answered = [r for r in records if r["answer"] == "42"]
    forever = [r for r in records if r["answer"] == "zz"]
    assert answered and forever
    for record in answered:
        assert [t["role"] for t in record["turns"]] == ["assistant", "tool", "tool", "assistant"]
        assert [c["name"] for c in record["turns"][0]["tool_calls"]] == ["boom", "sleepy"]
        boom, sleepy = record["turns"][1:3]
        assert boom["error"] and "raised KeyError" in boom["content"]
        assert sleepy["error"] and "longer than 0.5s" in sleepy["content"]
        assert record["finish"] == "eos" and record["reward"] == 1.0 and record["tool_calls"] == 2
    for record in forever:  # the model that never stops calling tools: ended at max_tool_calls, truncated
        assert record["finish"] == "max_tool_calls" and record["truncated"] and record["tool_calls"] == 4
        assert "max_tool_calls=4" in record["error"] and record["reward"] == 0.0
    assert all("boom" in r["prompt"] and "sleepy" in r["prompt"] for r in records)  # the tools shown in the prompt


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("environment", "{env}:Missing", "has no attribute 'Missing'"),
        ("environment", "{env}:NoStep", "has no method step"),
        ("tools", ["{env}:nothing"], "has no attribute 'nothing'"),
    ],
)
def test_a_missing_environment_or_tool_is_refused_at_submit(tiny_model_dir, tmp_path, home, field, value, message):
    from engine.errors import SpecError
    from jobs.runs import Jobs

    env = tmp_path / "env.py"
    env.write_text("class NoStep:\n    def reset(self, row):\n        return None\n")
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a", "answer": "b"}])
    value = [v.format(env=env) for v in value] if isinstance(value, list) else value.format(env=env)
    with pytest.raises(SpecError, match=message) as refused:
        Jobs().check(run_spec(tiny_model_dir, data, **{field: value}))
    assert refused.value.field == field
