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
    finish       str    "eos" | "length"
    judge        list | null    an LLM judge's verdicts, both orders, where a judge is used
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

ROLLOUTS_DIR = "rollouts"


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
