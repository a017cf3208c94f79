"""Every training rollout of an online run, kept on disk as data.

Layout: `RUN_DIR/rollouts/step-000012.jsonl`, one shard per step, one JSON object per sample. A shard is
written whole to a temporary file, fsynced and renamed into place, so a crash leaves complete shards
only, and `datasets.load_dataset("json", data_files="RUN_DIR/rollouts/*.jsonl")` loads the store.

One record (the field names are the store's schema; readers must accept extra fields):

    step         int    the training step the sample was drawn at
    group        int    index of its prompt within the step (samples of one prompt share it)
    sample       int    index within the group
    prompt       str    the prompt text as the policy saw it (after the chat template)
    messages     list | null   the conversation (chat data), the completion as its last assistant turn
    completion   str    the decoded completion
    rewards      {name: float | null}   each reward source's raw score (null: it gave none)
    reward       float | null   the total after weights and penalties (null: no reward source, e.g. an LLM judge alone)
    advantage    float | null   what the update weighted the sample by (GRPO/RLOO/PPO), null otherwise
    kl           float | null   the sample's summed per-token KL to the reference, where one is computed
    logp_mean    float | null   mean per-token log-prob under the rollout policy, where computed
    length       int    completion tokens
    truncated    bool   hit max_new_tokens without EOS
    finish       str    "eos" (ended by itself: its EOS or a stop string) | "length"
    judge        list | null    an LLM judge's verdicts, both orders, where a judge is used: per order
                        {"shown": 1 | 2 (the answer position it was shown at), "p_better": the judge's
                        probability that this sample is the better one}
    answer       str | null     the prompt's gold answer, where the data has one
    chosen       bool | null    online DPO: the update took it as the pair's chosen (true) or rejected
                        (false); null: the pair was skipped as a tie, or another method

A multi-turn episode (a run with an `environment` or `tools`: engine/episodes.py) also has:

    turns        list   its messages after the prompt, in order: assistant turns (with "tool_calls":
                        [{"name", "arguments"}] where the turn called tools) and the environment's
                        messages (tool results are role "tool"; one that reports an error has "error": true)
    error        str | null     what the environment did wrong, when the episode ended on it (reward 0)
    tool_calls   int    tool calls the episode made
    env_reward   float  the environment's per-turn rewards, summed
and `messages` is the prompt's messages followed by the turns, `completion` the last assistant turn,
`length` the whole episode's tokens (the environment's included), `finish` one of eos (done), length (a
turn hit max_new_tokens), max_turns, max_tool_calls or error.

Which method fills what: GRPO and RLOO record each sample's advantage (null for a sample left out of
the loss by mask_truncated); PPO the mean of its tokens' whitened advantages. `logp_mean` and `kl`
come from the log-probs a method computes anyway, never from an extra forward pass: PPO always, RLOO
with beta > 0 or num_iterations > 1, GRPO with num_iterations > 1 (kl: with beta > 0 too). Best-of-K
and ReST fill none of the three. The online loop calls `keep_rollout` right after the algorithm's
`prepare` (which leaves its per-sample values in `Rollout.sample_stats`), on rank 0, with the run's
`log_rollouts` setting: all, a number N (the first N samples of each step) or off. The reporter writes
the shard (`engine.reporting.RunDirReporter`) and, in Redis mode, streams the records to the store
(jobs/shared.py) so `cherry rollouts` works on other machines.

`preference_pairs` and `best_completions` turn records into training data for `cherry train`:
TRL's preference format (prompt, chosen, rejected) and prompt/completion rows, conversational
(message lists) when the rollout has messages.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROLLOUTS_DIR = "rollouts"
LOG_ROLLOUTS_WORDS = ("all", "off")  # `log_rollouts` takes one of these or a number of samples per step


def shard_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / ROLLOUTS_DIR / f"step-{step:06d}.jsonl"


def write_shard(run_dir: str | Path, step: int, records: list[dict]) -> Path:
    """One step's records, durably: a reader never sees a half-written shard."""
    path = shard_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".jsonl.partial")
    with open(partial, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    return path


def stored_steps(run_dir: str | Path) -> list[int]:
    folder = Path(run_dir) / ROLLOUTS_DIR
    if not folder.is_dir():
        return []
    return sorted(int(p.stem.split("-", 1)[1]) for p in folder.glob("step-*.jsonl"))


def read_rollouts(run_dir: str | Path, steps: Iterable[int] | None = None) -> list[dict]:
    """The stored records, by step then group then sample; `steps` limits which shards are read."""
    wanted = stored_steps(run_dir) if steps is None else sorted(set(steps))
    records: list[dict] = []
    for step in wanted:
        path = shard_path(run_dir, step)
        if path.exists():
            with open(path, encoding="utf-8") as f:
                records.extend(json.loads(line) for line in f if line.strip())
    return records


def groups(records: list[dict]) -> dict[tuple[int, int], list[dict]]:
    """Records keyed by (step, group), each group's samples in order."""
    out: dict[tuple[int, int], list[dict]] = {}
    for record in records:
        out.setdefault((record["step"], record["group"]), []).append(record)
    for samples in out.values():
        samples.sort(key=lambda r: r["sample"])
    return out


def remove_shards_after(run_dir: str | Path, step: int) -> None:
    """A resumed run replays the steps after its checkpoint: their shards are written again."""
    for later in stored_steps(run_dir):
        if later > step:
            shard_path(run_dir, later).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- writing: a rollout's records


def rollout_limit(setting: Any) -> int | None:
    """`log_rollouts` as the number of samples kept per step: None = all, 0 = off. ValueError when it is
    neither a word of LOG_ROLLOUTS_WORDS nor a whole number >= 1."""
    if setting == "all":
        return None
    if setting == "off":
        return 0
    if isinstance(setting, int) and not isinstance(setting, bool) and setting >= 1:
        return setting
    raise ValueError(f"log_rollouts must be all, off or a number of samples per step >= 1 (got {setting!r})")


def _number(value: Any) -> float | None:
    """A JSON-safe float: None for a missing or non-finite value (`datasets` cannot read NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def rollout_records(rollout, step: int, limit: int | None = None) -> list[dict]:
    """The store's records of one scored, prepared rollout (engine.rollout.Rollout) at `step`; `limit`
    keeps its first N samples (None = all of them)."""
    count = len(rollout.completion_ids) if limit is None else min(limit, len(rollout.completion_ids))
    rewards = rollout.rewards.tolist() if rollout.rewards is not None else None
    stats = rollout.sample_stats
    records = []
    for i in range(count):
        example = rollout.examples[i]
        text = rollout.texts[i]
        conversation = example.get("messages")
        record = {
            "step": step,
            "group": i // rollout.group_size,
            "sample": i % rollout.group_size,
            "prompt": example["prompt"],
            "messages": [*conversation, {"role": "assistant", "content": text}]
            if isinstance(conversation, list)
            else None,
            "completion": text,
            "rewards": {name: _number(values[i]) for name, values in rollout.components.items()},
            "reward": _number(rewards[i]) if rewards is not None else None,
            "advantage": _number(stats["advantage"][i]) if "advantage" in stats else None,
            "kl": _number(stats["kl"][i]) if "kl" in stats else None,
            "logp_mean": _number(stats["logp_mean"][i]) if "logp_mean" in stats else None,
            "length": len(rollout.completion_ids[i]),
            "truncated": bool(rollout.truncated[i]),
            "finish": "length" if rollout.truncated[i] else "eos",
            "judge": stats["judge"][i] if "judge" in stats else None,
            "answer": example.get("answer"),
            "chosen": stats["chosen"][i] if "chosen" in stats else None,
        }
        if rollout.episodes is not None:
            record.update(episode_fields(rollout.episodes[i], conversation))
        records.append(record)
    return records


def episode_fields(episode, conversation: list | None) -> dict:
    """A multi-turn episode's part of its record: its turns, how it ended, the environment's reward."""
    turns = [dict(turn) for turn in episode.turns]
    for turn in turns:  # a tool result that reports a failure is marked, so a reader can find it
        if turn["role"] == "tool" and turn["content"].startswith("error:"):
            turn["error"] = True
    return {
        "messages": [*conversation, *turns] if isinstance(conversation, list) else None,
        "turns": turns,
        "finish": episode.finish,
        "error": episode.error,
        "tool_calls": episode.tool_calls,
        "env_reward": _number(episode.reward),
    }


def keep_rollout(reporter, step: int, rollout, setting: Any) -> None:
    """Hand `log_rollouts`' share of a step's rollout to the reporter (rank 0 calls this once per step)."""
    limit = rollout_limit(setting)
    if limit != 0 and rollout.completion_ids:
        reporter.log_rollouts(step, rollout_records(rollout, step, limit))


def turn_label(turn: dict) -> str:
    """How a reader names an episode's turn: its role, the tools an assistant turn calls, a tool's name, an error."""
    label = turn.get("role", "?")
    if turn.get("tool_calls"):
        label += " calls " + ", ".join(str(call.get("name")) for call in turn["tool_calls"])
    if label == "tool" and turn.get("name"):
        label += f" {turn['name']}"
    return label + (" (error)" if turn.get("error") else "")


# ----------------------------------------------------------------------------- reading: filters and exports


def select(
    records: list[dict],
    *,
    steps: Iterable[int] | None = None,
    groups_wanted: Iterable[int] | None = None,
    min_reward: float | None = None,
    max_reward: float | None = None,
    text: str | None = None,
) -> list[dict]:
    """The records that pass every filter given: their step and group among those listed, their total
    reward within [min_reward, max_reward] (a record with no reward fails any bound), `text` in their
    prompt or completion (case-insensitive)."""
    steps = set(steps) if steps else None
    groups_wanted = set(groups_wanted) if groups_wanted else None
    needle = text.lower() if text else None
    out = []
    for record in records:
        reward = record.get("reward")
        if steps is not None and record["step"] not in steps:
            continue
        if groups_wanted is not None and record["group"] not in groups_wanted:
            continue
        if (min_reward is not None or max_reward is not None) and reward is None:
            continue
        if (min_reward is not None and reward < min_reward) or (max_reward is not None and reward > max_reward):
            continue
        if needle and needle not in record["prompt"].lower() and needle not in record["completion"].lower():
            continue
        out.append(record)
    return out


def _ranked(samples: list[dict]) -> list[dict]:
    """A group's samples that have a reward, best first (the earlier sample first among equals)."""
    scored = [s for s in samples if s.get("reward") is not None]
    return sorted(scored, key=lambda s: (-s["reward"], s["sample"]))


def _prompt_and_answer(record: dict) -> tuple[Any, Any]:
    """(prompt, completion) as TRL reads them: message lists for conversational data, else texts."""
    messages = record.get("messages")
    if isinstance(messages, list) and messages:
        return messages[:-1], messages[-1:]
    return record["prompt"], record["completion"]


def preference_pairs(records: list[dict]) -> list[dict]:
    """The best against the worst completion of each (step, group), in TRL's preference format
    ({"prompt", "chosen", "rejected"}); a group whose best and worst rewards tie (zero variance: nothing
    to prefer) or whose two texts are the same is skipped."""
    pairs = []
    for samples in groups(records).values():
        ranked = _ranked(samples)
        if len(ranked) < 2:
            continue
        best, worst = ranked[0], ranked[-1]
        if best["reward"] == worst["reward"] or best["completion"] == worst["completion"]:
            continue
        prompt, chosen = _prompt_and_answer(best)
        _, rejected = _prompt_and_answer(worst)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def best_completions(records: list[dict]) -> list[dict]:
    """The best completion of each (step, group) with a reward, as {"prompt", "completion"} rows."""
    rows = []
    for samples in groups(records).values():
        ranked = _ranked(samples)
        if ranked:
            prompt, completion = _prompt_and_answer(ranked[0])
            rows.append({"prompt": prompt, "completion": completion})
    return rows


EXPORTS = {"pairs": preference_pairs, "sft": best_completions}


def export_rows(records: list[dict], kind: str, out: str | Path) -> int:
    """Write `EXPORTS[kind]` of the records as JSONL to `out` (written whole, then renamed); the row count.
    No rows: nothing is written."""
    rows = EXPORTS[kind](records)
    if not rows:
        return 0
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with open(partial, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(partial, out)
    return len(rows)
