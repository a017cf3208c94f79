"""Multi-turn episodes: the loss sees the policy's own tokens only (the perturbation test), the environment
contract's checks, the tools' schemas and call parser, and what a failing environment leaves behind."""

from __future__ import annotations

import time

import pytest
import torch

from engine.algorithms import build_algorithm
from engine.algorithms.base import Models
from engine.environments import EnvironmentFailure, check_step, guarded, load_environment
from engine.errors import SpecError
from engine.models import freeze, load_causal_lm, load_tokenizer
from engine.reference import Reference
from engine.rollout import Episode, Rollout
from engine.spec import build_spec
from engine.tools import ToolEnvironment, load_tools, parse_tool_calls, tool_schema

CPU = torch.device("cpu")

# Two prompts x two samples; completions mix the policy's tokens (1) and the environment's (0).
PROMPTS = [[5, 6, 7], [8, 9]]
COMPLETIONS = [
    ([40, 41, 1, 60, 61, 62, 42, 1], [1, 1, 1, 0, 0, 0, 1, 1]),
    ([43, 1, 63, 44, 45, 1], [1, 1, 0, 1, 1, 1]),
    ([46, 47, 48, 1, 64, 65, 49, 1], [1, 1, 1, 1, 0, 0, 1, 1]),
    ([50, 1, 66, 67, 68, 69, 51, 52, 1], [1, 1, 0, 0, 0, 0, 1, 1, 1]),
]


def episode_rollout() -> Rollout:
    examples = [{"prompt": f"p{g}", "prompt_ids": PROMPTS[g]} for g in (0, 0, 1, 1)]
    ids = [c for c, _ in COMPLETIONS]
    episodes = [Episode(turns=[], policy_mask=m) for _, m in COMPLETIONS]
    rollout = Rollout(examples, ids, ["x"] * 4, [False] * 4, 2, rewards=torch.tensor([1.0, 0.0, 0.5, 2.0]))
    rollout.episodes = episodes
    return rollout


def perturb_environment_positions(model: torch.nn.Module, rollout: Rollout, scale: float = 5.0):
    """A hook on the body's final norm that adds noise at every position that predicts an environment token, in
    the layouts the update scores in (full rows [B, L]; a shared prompt's completions [B, Lc]). Only those
    tokens' log-probs (and values) change: the norm's output feeds nothing but the head."""
    full_width = max(len(p) + len(c) for p, c in zip(rollout.prompt_ids, rollout.completion_ids))
    completion_width = max(len(c) for c in rollout.completion_ids)
    full = torch.zeros(4, full_width, dtype=torch.bool)
    completions = torch.zeros(4, completion_width, dtype=torch.bool)
    for row, (prompt, (_, mask)) in enumerate(zip(rollout.prompt_ids, COMPLETIONS)):
        for t, scored in enumerate(mask):
            if not scored:  # completion token t is predicted by full position len(prompt) + t - 1 ...
                full[row, len(prompt) + t - 1] = True
                completions[row, t - 1] = True  # ... and by completion position t - 1 of a shared prompt's pass
    noise = torch.Generator().manual_seed(1)

    def hook(module, args, output):
        for mask in (full, completions):
            if output.shape[:2] == mask.shape:
                bump = torch.randn(output.shape, generator=noise) * scale
                return output + bump * mask[..., None]
        return output

    body = model.classifier if hasattr(model, "classifier") else model
    return body.base_model.norm.register_forward_hook(hook)


def loss_and_gradients(algorithm: str, model_dir, perturb: bool, as_policy: bool = False):
    """The first micro-batch's loss and the policy's (and value model's) gradients after prepare + loss."""
    spec = build_spec(
        dict(algorithm=algorithm, model=str(model_dir), dataset="unused.jsonl", batch_size=2, num_generations=2,
             beta=0.1, num_iterations=2, max_new_tokens=8, temperature=0.8)
    )  # fmt: skip
    torch.manual_seed(0)
    algo = build_algorithm(spec)
    policy = load_causal_lm(str(model_dir), dtype=torch.float32, device=CPU)
    reference = Reference(model=freeze(load_causal_lm(str(model_dir), dtype=torch.float32, device=CPU)))
    value = algo.build_value_model(CPU, torch.float32)
    models = Models(
        policy=policy, tokenizer=load_tokenizer(str(model_dir)), device=CPU, reference=reference, value=value
    )
    rollout = episode_rollout()
    if as_policy:  # the control: every token the policy's, so the perturbation must show
        for episode in rollout.episodes:
            episode.policy_mask = [1] * len(episode.policy_mask)
    hooks = [perturb_environment_positions(m, rollout) for m in (policy, value) if perturb and m is not None]
    try:
        rows, _ = algo.prepare(rollout, models)
        batch = algo.collate(rows, models.tokenizer.pad_token_id)
        loss, _ = algo.loss(models, batch, rows)
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    trained = [p for m in (policy, value) if m is not None for p in m.parameters() if p.grad is not None]
    return loss.detach(), [p.grad.clone() for p in trained]


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "ppo"])
def test_environment_tokens_log_probs_change_nothing_in_the_loss_or_the_gradient(tiny_model_dir, algorithm):
    loss, grads = loss_and_gradients(algorithm, tiny_model_dir, perturb=False)
    perturbed_loss, perturbed_grads = loss_and_gradients(algorithm, tiny_model_dir, perturb=True)
    assert torch.equal(loss, perturbed_loss)
    assert len(grads) == len(perturbed_grads) and all(torch.equal(a, b) for a, b in zip(grads, perturbed_grads))
    # the control: were the environment's tokens the policy's, the same perturbation would move both
    control_loss, control_grads = loss_and_gradients(algorithm, tiny_model_dir, perturb=False, as_policy=True)
    moved_loss, moved_grads = loss_and_gradients(algorithm, tiny_model_dir, perturb=True, as_policy=True)
    assert not torch.equal(control_loss, moved_loss)
    assert any(not torch.equal(a, b) for a, b in zip(control_grads, moved_grads))


# ----------------------------------------------------------------------------- the contract's checks


def write(tmp_path, text: str):
    path = tmp_path / "env.py"
    path.write_text(text)
    return path


def test_an_environment_without_the_contract_is_refused_naming_the_field(tmp_path):
    path = write(
        tmp_path,
        "class NoStep:\n    def reset(self, row): return None\n"
        "class WrongStep:\n    def reset(self, row): return None\n    def step(self): return None, 0.0, True\n"
        "class NeedsArgs:\n    def __init__(self, size): pass\n    def reset(self, row): return None\n"
        "    def step(self, text): return None, 0.0, True\n"
        "class Good:\n    def reset(self, row): return None\n    def step(self, text): return None, 0.0, True\n",
    )
    for name, message in (
        ("Missing", "has no attribute 'Missing'"),
        ("NoStep", "has no method step"),
        ("WrongStep", "step must take one argument besides self"),
        ("NeedsArgs", "constructible with no arguments"),
    ):
        with pytest.raises(SpecError, match=message) as refused:
            load_environment(f"{path}:{name}")
        assert refused.value.field == "environment"
    assert load_environment(f"{path}:Good")().step("x") == (None, 0.0, True)


def test_a_tool_that_is_missing_or_takes_positional_only_arguments_is_refused(tmp_path):
    path = tmp_path / "tools.py"
    path.write_text("def add(a: int, b: int = 0):\n    return a + b\n\ndef only(a, /):\n    return a\n")
    with pytest.raises(SpecError, match="no attribute 'sub'") as refused:
        load_tools([f"{path}:sub"])
    assert refused.value.field == "tools"
    with pytest.raises(SpecError, match="positional-only"):
        load_tools([f"{path}:only"])
    assert list(load_tools([f"{path}:add"])) == ["add"]


def test_a_step_of_the_wrong_shape_raises_or_hangs_fails_with_a_message():
    assert check_step(("hi", 1, False), "step") == ([{"role": "user", "content": "hi"}], 1.0, False)
    for value, message in (
        ((None, 1.0), "must return \\(observation, reward, done\\)"),
        ((None, float("nan"), True), "finite number"),
        ((None, 1.0, "yes"), "True or False"),
        (([{"role": "robot", "content": "x"}], 0.0, False), "each must be"),
    ):
        with pytest.raises(EnvironmentFailure, match=message):
            check_step(value, "step")
    with pytest.raises(EnvironmentFailure, match="raised ZeroDivisionError"):
        guarded("step", lambda: 1 / 0, None)
    started = time.time()
    with pytest.raises(EnvironmentFailure, match="longer than 0.2s"):
        guarded("step", lambda: time.sleep(5), 0.2)
    assert time.time() - started < 2


# ----------------------------------------------------------------------------- tools


def calculator(expression: str, digits: int = 0) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: the sum to work out, e.g. 12+30
        digits: decimals to round to
    """
    return str(round(eval(expression, {"__builtins__": {}}), digits))  # noqa: S307 - a test tool


def test_a_tool_schema_comes_from_the_signature_and_the_docstring():
    schema = tool_schema(calculator)["function"]
    assert schema["name"] == "calculator" and schema["description"] == "Evaluate an arithmetic expression."
    assert schema["parameters"]["required"] == ["expression"]
    assert schema["parameters"]["properties"] == {
        "expression": {"type": "string", "description": "the sum to work out, e.g. 12+30"},
        "digits": {"type": "integer", "description": "decimals to round to"},
    }


def test_tool_calls_are_parsed_run_and_their_mistakes_returned_as_tool_messages():
    assert parse_tool_calls("the answer is 4") == []
    assert parse_tool_calls('{"name": "calculator", "parameters": {"expression": "1+1"}}') == [
        {"name": "calculator", "arguments": {"expression": "1+1"}}
    ]
    env = ToolEnvironment({"calculator": calculator}, max_tool_calls=3, timeout=1)
    text = (
        '<tool_call>{"name": "calculator", "arguments": {"expression": "20+22"}}</tool_call>'
        "<tool_call>{not json}</tool_call>"
        '<tool_call>{"name": "search", "arguments": {}}</tool_call>'
    )
    observation, reward, done = env.step(text)
    assert (reward, done) == (0.0, False) and [m["role"] for m in observation] == ["tool"] * 3
    assert observation[0]["content"] == "42"
    assert observation[1]["content"].startswith("error: the tool call is not valid JSON")
    assert observation[2]["content"].startswith("error: no tool named 'search'")
    assert env.step("42") == (None, 0.0, True)
