"""Your own preference labels: two completions of one prompt, judged in the app, kept as training data.

Files, under the Cherry home (`HOME/labels/`):
- `NAME.jsonl`: one row per decided pair in the preference format Cherry and TRL train on,
  `{"prompt", "chosen", "rejected", "provenance"}`; `cherry submit --preset dpo --dataset` takes it as is.
- `NAME.ties.jsonl`: the pairs judged equally good, `{"prompt", "a", "b", "provenance"}`: kept as a record
  (a tie says something about the data) but not trained on, since a preference loss needs a winner.
A skipped pair writes nothing and comes back the next time the labels are opened.

`provenance` names where both completions came from, `{"source", "choice", "a": {"run", "step",
"sample"}, "b": {...}, "labelled_at"}` with the same keys on every row, so `datasets` loads the file.
Each label is appended, flushed and fsynced before the next pair is shown: a quit or a crash loses none.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.store import sample_kind

LABELS_DIR = "labels"
VERDICTS = ("a", "b", "tie")


@dataclass(frozen=True)
class Candidate:
    """Two completions of one prompt to judge, and where each came from."""

    prompt: str
    a: str
    b: str
    source: str  # rollouts | samples | runs
    run_a: str
    step_a: int | None
    sample_a: str  # the completion's id within its step: g3s1 (group 3, sample 1), reference, policy
    run_b: str
    step_b: int | None
    sample_b: str

    @property
    def key(self) -> str:
        """The pair's identity: labelled once, it is not offered again."""
        return f"{self.run_a}/{self.step_a}/{self.sample_a}|{self.run_b}/{self.step_b}/{self.sample_b}|{self.prompt}"


def label_name(text: str) -> str:
    """A file name for a label set (letters, digits, . _ -)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip(".-")
    return name or "labels"


def label_path(home: Path, name: str) -> Path:
    return Path(home) / LABELS_DIR / f"{label_name(name)}.jsonl"


def ties_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".jsonl") + ".ties.jsonl")


def provenance(candidate: Candidate, verdict: str, now: float) -> dict[str, Any]:
    return {
        "source": candidate.source,
        "choice": verdict,
        "a": {"run": candidate.run_a, "step": candidate.step_a, "sample": candidate.sample_a},
        "b": {"run": candidate.run_b, "step": candidate.step_b, "sample": candidate.sample_b},
        "labelled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
    }


def label_row(candidate: Candidate, verdict: str, now: float) -> dict[str, Any]:
    """The row a verdict writes: a preference pair (A or B better) or a tie."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    source = provenance(candidate, verdict, now)
    if verdict == "tie":
        return {"prompt": candidate.prompt, "a": candidate.a, "b": candidate.b, "provenance": source}
    chosen, rejected = (candidate.a, candidate.b) if verdict == "a" else (candidate.b, candidate.a)
    return {"prompt": candidate.prompt, "chosen": chosen, "rejected": rejected, "provenance": source}


def append_durably(path: Path, row: dict[str, Any]) -> None:
    """One JSON line, on disk (flushed and fsynced) when this returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def record_label(path: Path, candidate: Candidate, verdict: str, now: float | None = None) -> dict[str, Any]:
    """Append the verdict on `candidate` to the label file (a tie to its ties file); returns the row."""
    row = label_row(candidate, verdict, time.time() if now is None else now)
    append_durably(ties_path(path) if verdict == "tie" else path, row)
    return row


def repair(path: Path) -> None:
    """Cut a line a crash left half-written at the end of a label file, so it loads and appends cleanly."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    if not data or data.endswith(b"\n"):
        return
    with open(path, "r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)
        f.flush()
        os.fsync(f.fileno())


def read_rows(path: Path) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def candidate_key(row: dict[str, Any]) -> str:
    source = row.get("provenance") or {}
    a, b = source.get("a") or {}, source.get("b") or {}
    return f"{a.get('run')}/{a.get('step')}/{a.get('sample')}|{b.get('run')}/{b.get('step')}/{b.get('sample')}|{row.get('prompt')}"


@dataclass
class LabelFile:
    """A label set: its pairs file, its ties file, and what has been labelled so far."""

    path: Path
    pairs: int = 0
    ties: int = 0

    def __post_init__(self) -> None:
        for each in (self.path, ties_path(self.path)):
            repair(each)
        pair_rows, tie_rows = read_rows(self.path), read_rows(ties_path(self.path))
        self.pairs, self.ties = len(pair_rows), len(tie_rows)
        self.done = {candidate_key(row) for row in pair_rows + tie_rows}

    def record(self, candidate: Candidate, verdict: str, now: float | None = None) -> dict[str, Any]:
        row = record_label(self.path, candidate, verdict, now)
        if verdict == "tie":
            self.ties += 1
        else:
            self.pairs += 1
        self.done.add(candidate.key)
        return row


# ----------------------------------------------------------------------------- where pairs come from


def rollout_candidates(run_id: str, groups) -> list[Candidate]:
    """A step's rollout groups as pairs to judge: samples 0 vs 1, 2 vs 3, ... of each group (each completion
    judged once, in the order drawn, so the reward does not pick the pairs), identical completions skipped."""
    out = []
    for group in groups:
        samples = group.samples
        for first, second in zip(samples[0::2], samples[1::2]):
            a, b = str(first.get("completion") or ""), str(second.get("completion") or "")
            if a == b:
                continue
            out.append(
                Candidate(
                    group.prompt,
                    a,
                    b,
                    "rollouts",
                    run_id,
                    group.step,
                    f"g{group.index}s{first.get('sample')}",
                    run_id,
                    group.step,
                    f"g{group.index}s{second.get('sample')}",
                )  # fmt: skip
            )
    return out


def sample_candidates(run_id: str, step: int | None, rows: list[dict[str, Any]]) -> list[Candidate]:
    """A logged step's eval samples: the reference's completion (A) against the policy's (B) where they differ."""
    out = []
    for row in rows:
        if sample_kind(row) != "comparison":
            continue
        a, b = str(row.get("reference") or ""), str(row.get("policy") or "")
        if a and b and a != b:
            out.append(
                Candidate(
                    str(row.get("prompt") or ""), a, b, "samples", run_id, step, "reference", run_id, step, "policy"
                )
            )
    return out


def run_candidates(matched, run_a: str, step_a: int | None, run_b: str, step_b: int | None) -> list[Candidate]:
    """Two runs' policies on the same prompts (tuiapp.data.match_samples), where they answered differently."""
    out = []
    for prompt, row_a, row_b in matched.shared:
        a, b = str(row_a.get("policy") or ""), str(row_b.get("policy") or "")
        if a and b and a != b:
            out.append(Candidate(prompt, a, b, "runs", run_a, step_a, "policy", run_b, step_b, "policy"))
    return out


# ----------------------------------------------------------------------------- training on them

TRAIN_METHODS = {"dpo": "DPO", "rm": "reward model"}


def frozen_copy(path: Path) -> Path:
    """The label pairs so far as a file of their own (`NAME.firstN.jsonl`), so a queued run trains on
    what was labelled when it was started, not on what is appended while it waits. The pairs file only
    grows, so the same count means the same rows and an existing copy is reused."""
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path} holds no labelled pairs yet")
    frozen = path.with_name(f"{path.name.removesuffix('.jsonl')}.first{len(rows)}.jsonl")
    if not frozen.exists():
        partial = frozen.with_name(frozen.name + ".partial")
        with open(partial, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, frozen)
    return frozen


def labels_spec(path: Path, method: str, model: str, name: str):
    """The run that trains on the labels in `path` (a frozen copy): the method's preset, the source run's
    starting model, the file as its dataset (the same resolve_spec the new-run form calls)."""
    from engine.spec import resolve_spec

    if method not in TRAIN_METHODS:
        raise ValueError(f"method must be one of {sorted(TRAIN_METHODS)}, got {method!r}")
    return resolve_spec(method, [f"name={name}-{method}"], model=model, dataset=str(path), check_paths=False)
