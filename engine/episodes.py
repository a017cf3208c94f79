"""Multi-turn rollouts: the policy and an environment (or tools) take turns, up to `max_turns` policy turns.

Each of the step's rows (a prompt's k samples) is one episode with its own environment instance. A turn
samples the next assistant message of every episode still running, together (`engine.rollout.Decoder`,
one batch of left-padded contexts: an episode that is done costs nothing more); each is then handed to its
environment's `step`, whose observation is rendered and appended as context for the next turn.

The whole episode after the prompt is one completion: the policy's tokens (each turn up to and including
its EOS) and the environment's in between. `Episode.policy_mask` marks which are which: the update's loss,
KL and ratios see the policy's tokens only (engine/batching.py masks the rest out of `completion_mask`).

Rendering an observation: with a conversational prompt, what the chat template adds for the observation
messages and the next generation prompt after the conversation so far (and whatever the template writes
after the assistant's end token, such as chatml's newline); with a text prompt, the observation's contents
on lines of their own. Either way they are tokenised without special tokens being added.

Rewards: each turn's reward is summed into `Episode.reward` (the `environment` reward source); reward
functions score the episode's last assistant message, with the episode as `turns`. An environment that
raises, hangs past `tool_timeout` or returns the wrong shape ends its episode there: the error is recorded
(`Episode.error`, finish "error") and the online loop gives the episode a zero reward.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from engine.environments import EnvironmentFailure, EpisodeTruncated, as_messages, check_step, guarded
from engine.errors import CherryError
from engine.limits import CHAT_TEMPLATE_SECONDS, time_limit
from engine.rollout import Decoder, Episode, Rollout, Sampling
from engine.tools import tools_system_message


def _render(tokenizer, messages: list[dict], generation_prompt: bool, tools: list[dict] | None = None) -> str:
    """The conversation through the chat template (tool-call markings left out: the text already holds them)."""
    plain = [{k: v for k, v in m.items() if k in ("role", "content", "name")} for m in messages]
    extra = {"tools": tools} if tools else {}
    with time_limit(CHAT_TEMPLATE_SECONDS, "the chat template"):
        return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=generation_prompt, **extra)


def renders_tools(tokenizer) -> bool:
    """Whether the chat template reads the `tools` variable (else the tools go into a system message)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=special)["input_ids"])
    if special and ids and ids[-1] == tokenizer.eos_token_id and len(ids) > 1:
        ids.pop()  # a tokenizer that appends EOS to single sequences: a prompt has none
    return ids


class EpisodeRun:
    """One episode in progress: its context tokens, its turns, and its environment."""

    def __init__(self, example: dict, make_env: Callable[[], Any], timeout: float | None):
        self.example, self.timeout = example, timeout
        self.completion: list[int] = []
        self.episode = Episode(turns=[], policy_mask=[])
        self.messages: list[dict] | None = None  # the conversation so far (conversational episodes)
        self.done = False
        self.env = None
        try:
            self.env = guarded("the environment's constructor", make_env, timeout)
        except EnvironmentFailure as err:
            self.fail(str(err))

    def fail(self, error: str) -> None:
        self.episode.error, self.episode.finish, self.done = error, "error", True

    def start(self, tokenizer) -> dict:
        """The episode's prompt example: `reset(row)`'s prompt (the dataset's when it returns None), with the tools."""
        example = self.example
        prompt = None
        if self.env is not None:
            try:
                prompt = guarded("the environment's reset", lambda: self.env.reset(dict(example)), self.timeout)
                if prompt is not None and not isinstance(prompt, str):
                    prompt = as_messages(prompt, "the environment's reset")
            except (EnvironmentFailure, EpisodeTruncated) as err:
                self.fail(str(err))
                prompt = None
        tools = getattr(self.env, "tool_schemas", None)
        if prompt is None and not tools:
            self.messages = list(example["messages"]) if example.get("messages") else None
            return example
        if prompt is None:
            prompt = list(example["messages"]) if example.get("messages") else example["prompt"]
        if isinstance(prompt, str):
            text = f"{tools_system_message(tools)}\n\n{prompt}" if tools else prompt
            return {**example, "prompt": text, "prompt_ids": _encode(tokenizer, text, True), "messages": None}
        self.messages = list(prompt)
        if tools and renders_tools(tokenizer):
            text = _render(tokenizer, self.messages, True, tools)
        else:
            if tools:
                self.messages = [{"role": "system", "content": tools_system_message(tools)}, *self.messages]
            text = _render(tokenizer, self.messages, True)
        prompt_ids = _encode(tokenizer, text, False)
        return {**example, "prompt": text, "prompt_ids": prompt_ids, "messages": list(self.messages)}

    def policy_turn(self, ids: list[int], cut: bool, text: str, last: bool, decode: Decoder) -> None:
        """Take the sampled assistant turn, step the environment, and append its observation (unless done)."""
        episode = self.episode
        self.completion += ids
        episode.policy_mask += [1] * len(ids)
        turn: dict = {"role": "assistant", "content": text}
        episode.turns.append(turn)
        if self.messages is not None:
            self.messages.append({"role": "assistant", "content": text})
        if cut:  # no EOS: the turn ran into max_new_tokens, and the episode ends with it
            episode.finish, self.done = "length", True
            return
        if self.env is None:
            self.done = True
            return
        try:
            timeout = None if getattr(self.env, "times_its_calls", False) else self.timeout
            observation, reward, done = check_step(
                guarded("the environment's step", lambda: self.env.step(text), timeout), "the environment's step"
            )
        except EnvironmentFailure as err:
            self.fail(str(err))
            return
        except EpisodeTruncated as err:
            episode.finish, episode.error, self.done = "max_tool_calls", str(err), True
            return
        finally:
            episode.tool_calls = getattr(self.env, "tool_calls", 0)
            called = getattr(self.env, "called", None)
            if called:
                turn["tool_calls"] = list(called)
        episode.reward += reward
        if done:
            self.done = True
            return
        if last:
            episode.finish, self.done = "max_turns", True
            return
        if not observation:
            return  # nothing to show: the policy takes another turn on its own context
        try:
            observed = self.observation_ids(decode, observation, ids)
        except CherryError as err:
            self.fail(str(err))
            return
        self.completion += observed
        episode.policy_mask += [0] * len(observed)
        episode.turns += observation

    def observation_ids(self, decode: Decoder, observation: list[dict], turn_ids: list[int]) -> list[int]:
        """The tokens that show `observation` after the turn just sampled (`turn_ids`), and the next generation prompt."""
        tokenizer = decode.tokenizer
        if self.messages is None:
            return _encode(tokenizer, "\n" + "\n".join(m["content"] for m in observation) + "\n", False)
        before = _render(tokenizer, self.messages, False)
        after = _render(tokenizer, self.messages + observation, True)
        if not after.startswith(before):
            raise CherryError(
                "the chat template is not prefix-consistent: a conversation rendered with the environment's "
                "observation does not extend its earlier rendering, so the observation cannot be appended"
            )
        text = self.closing(before, decode, turn_ids) + after[len(before) :]
        self.messages += observation
        return _encode(tokenizer, text, False)

    def closing(self, before: str, decode: Decoder, turn_ids: list[int]) -> str:
        """What the template writes after the turn's content that the sampled tokens lack: after an EOS, what
        follows the end token (chatml's newline); after a stop string, the end token too."""
        content = self.messages[-1]["content"] if self.messages else ""
        ended = bool(turn_ids) and turn_ids[-1] in decode.eos
        end = decode.tokenizer.decode(turn_ids[-1:]) if ended else ""
        at = before.rfind(content) if content else -1
        if at >= 0:
            tail = before[at + len(content) :]
        else:  # an empty turn, or a template that rewrites the content: from the end token on
            at = before.rfind(end) if end else -1
            return before[at + len(end) :] if at >= 0 else ""
        return tail[len(end) :] if end and tail.startswith(end) else tail


@torch.no_grad()
def sample_episodes(
    model,
    tokenizer,
    examples: list[dict],
    make_env: Callable[[], Any],
    *,
    k: int,
    sampling: Sampling,
    max_turns: int,
    timeout: float | None = None,
) -> Rollout:
    """k episodes per example, each up to `max_turns` policy turns of at most `sampling.max_new_tokens` tokens.
    `texts` are the episodes' last assistant messages; `episodes` their turns, policy masks and rewards."""
    decode = Decoder(model, tokenizer, sampling)
    started = time.time()
    runs = [EpisodeRun(ex, make_env, timeout) for ex in examples for _ in range(k)]
    rows = [run.start(tokenizer) for run in runs]
    was_training = model.training
    model.eval()
    try:
        for turn in range(max_turns):
            active = [(run, row) for run, row in zip(runs, rows) if not run.done or (turn == 0 and not run.completion)]
            if not active:
                break
            samples = decode([row["prompt_ids"] + run.completion for run, row in active])
            for (run, _), (ids, cut) in zip(active, samples):
                if run.done:  # failed before its first turn: it still answers once, with no environment
                    run.completion += ids
                    run.episode.policy_mask += [1] * len(ids)
                    run.episode.turns.append({"role": "assistant", "content": decode.text(ids)})
                    continue
                run.policy_turn(ids, cut, decode.text(ids), turn == max_turns - 1, decode)
    finally:
        model.train(was_training)
    episodes = [run.episode for run in runs]
    texts = [next((t["content"] for t in reversed(e.turns) if t["role"] == "assistant"), "") for e in episodes]
    truncated = [e.finish in ("length", "max_turns", "max_tool_calls") for e in episodes]
    rollout = Rollout(rows, [run.completion for run in runs], texts, truncated, k, seconds=time.time() - started)
    rollout.episodes = episodes
    return rollout


def episode_metrics(rollout: Rollout) -> dict[str, float]:
    """What a multi-turn rollout did: turns, tool calls, how episodes ended, the environment's share of tokens."""
    episodes = rollout.episodes or []
    if not episodes:
        return {}
    n = len(episodes)
    tokens = sum(len(e.policy_mask) for e in episodes)
    policy = sum(sum(e.policy_mask) for e in episodes)
    metrics = {
        "tokens/env_fraction": (tokens - policy) / max(tokens, 1),
        "episode/turns_mean": sum(sum(t["role"] == "assistant" for t in e.turns) for e in episodes) / n,
        "episode/tool_calls_mean": sum(e.tool_calls for e in episodes) / n,
        "episode/env_reward_mean": sum(e.reward for e in episodes) / n,
        "episode/error_frac": sum(e.finish == "error" for e in episodes) / n,
        "episode/max_turns_frac": sum(e.finish in ("max_turns", "max_tool_calls") for e in episodes) / n,
    }
    return metrics
