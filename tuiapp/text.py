"""Runs and samples as text, shared by the app and the CLI. Light on purpose: `cherry --help` imports
it, so nothing heavy (the store, sqlite-utils, pandas) is imported at module level."""

from __future__ import annotations

import re
from typing import Any

# Characters a terminal acts on instead of showing: C0 controls but newline and tab (ESC starts CSI/OSC
# sequences: colours, the window title, the clipboard), DEL, C1 controls, and the bidi overrides that
# make text read differently from what it holds.
_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(value: Any) -> str:
    """`value` as text a terminal shows literally: every control character written as an escape (ESC as
    `\\x1b`). Use it on every string that comes from data, models, runs or logs before it is printed;
    in the app, show the result as plain `rich.text.Text` (never as markup)."""
    text = value if isinstance(value, str) else str(value)
    return _UNSAFE.sub(_escaped, text)


def safe_data(value: Any) -> Any:
    """`safe_text` applied to every string (keys included) inside lists, tuples and dicts."""
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, dict):
        return {safe_data(k): safe_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(safe_data(v) for v in value)
    return value


# The metric a run is summarised by in tables (the first one it has).
KEY_METRICS = ("eval/exact_match", "eval/rewards/accuracy", "rewards/accuracy", "train/loss")


def _mark(score) -> str:
    return "" if score is None else (" ✓" if score >= 1 else " ✗")


def _num(value) -> str:
    return "-" if value is None else f"{value:+.4g}"


def margin_stats(rows: list[dict]) -> tuple[int, int, float] | None:
    """(pairs with a margin, pairs where chosen is ahead, mean margin) of a step's preference rows."""
    margins = [r["margin"] for r in rows if r.get("kind") == "preference" and r.get("margin") is not None]
    if not margins:
        return None
    return len(margins), sum(1 for m in margins if m > 0), sum(margins) / len(margins)


def sample_lines(rows: list[dict], limit: int) -> list[str]:
    """A logged step's sample rows as text, by kind: reference vs policy on the eval prompts;
    chosen vs rejected with the method's reward of each and the margin; unpaired completions
    with their label and reward. `limit` rows of each kind."""
    from jobs.store import sample_kind

    out: list[str] = []
    by_kind: dict[str, list[dict]] = {}
    for row in rows:
        by_kind.setdefault(sample_kind(row), []).append(row)
    for row in by_kind.get("comparison", [])[:limit]:
        out.append(f"  prompt    {row.get('prompt')!r}")
        out.append(f"  reference {row.get('reference')!r}{_mark(row.get('reference_score'))}")
        out.append(
            f"  policy    {row.get('policy')!r}{_mark(row.get('policy_score'))}"
            + (f"   (answer {row['answer']!r})" if row.get("answer") is not None else "")
        )
        out.append("")
    pairs = by_kind.get("preference", [])
    if pairs:
        n, ahead, mean = margin_stats(pairs) or (0, 0, None)
        out.append(
            f"chosen vs rejected on {len(pairs)} eval pairs (reward = the method's own): "
            f"chosen ahead on {ahead}/{n}, mean margin {_num(mean)}"
        )
        for row in pairs[:limit]:
            margin = row.get("margin")
            out.append(f"  prompt    {row.get('prompt')!r}")
            out.append(f"  chosen    {row.get('chosen')!r}   reward {_num(row.get('chosen_reward'))}")
            out.append(f"  rejected  {row.get('rejected')!r}   reward {_num(row.get('rejected_reward'))}")
            out.append(f"  margin    {_num(margin)}{'' if margin is None else (' ✓' if margin > 0 else ' ✗')}")
            out.append("")
    unpaired = by_kind.get("unpaired", [])
    if unpaired:
        out.append(f"unpaired completions ({len(unpaired)} eval rows; reward = beta (log pi - log ref))")
        for row in unpaired[:limit]:
            label = "desirable" if row.get("label") else "undesirable"
            out.append(f"  prompt     {row.get('prompt')!r}")
            out.append(f"  completion {row.get('completion')!r}   {label}   reward {_num(row.get('reward'))}")
            out.append("")
    return out


def lower_is_better(metric: str) -> bool:
    """Losses and KL go down as a run improves; accuracies, rewards and margins go up (the sweep rules'
    default too)."""
    return "loss" in metric or "kl" in metric


# Settings that differ between any two runs without saying anything about how they train.
NOT_SETTINGS = ("name",)


def flat_spec(spec: dict, prefix: str = "") -> dict:
    """A spec with nested sections as dotted keys (lora.r)."""
    out: dict = {}
    for key, value in spec.items():
        if isinstance(value, dict):
            out.update(flat_spec(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def spec_diff(specs: list[dict], ignore: tuple[str, ...] = NOT_SETTINGS) -> list[tuple[str, list]]:
    """The settings whose values are not the same in every spec: (dotted key, each spec's value, None where
    a spec lacks it), in the order the keys first appear."""
    flat = [flat_spec(s) for s in specs]
    keys: dict[str, None] = {}
    for f in flat:
        keys.update(dict.fromkeys(f))
    out = []
    for key in keys:
        if key in ignore:
            continue
        values = [f.get(key) for f in flat]
        if any(v != values[0] for v in values[1:]):
            out.append((key, values))
    return out


def setting_text(value) -> str:
    """A spec value as a short cell: 1e-06, true, a,b, - for missing."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def manifest_facts(manifest: dict | None) -> dict:
    """A run manifest (engine/manifest.py) as the flat facts runs are compared on: package versions, the
    commit (with `+changes` when files differed from it), the data's fingerprint and counts, seed, device,
    precision and determinism; {} for a run that has none. When it was written is no fact about the run."""
    if not manifest:
        return {}
    commit = manifest.get("commit")
    data = manifest.get("data") or {}
    facts = {f"packages.{k}": v for k, v in (manifest.get("packages") or {}).items()}
    facts["commit"] = (commit["sha"][:12] + ("+changes" if commit.get("dirty") else "")) if commit else None
    facts["data.fingerprint"] = (data.get("fingerprint") or "")[:12] or None
    facts.update({f"data.{k}": v for k, v in (data.get("rows") or {}).items() if k in ("rows", "train", "eval")})
    facts["seed"] = manifest.get("seed")
    for part in ("device", "precision", "determinism"):
        facts.update({f"{part}.{k}": v for k, v in (manifest.get(part) or {}).items()})
    return facts


def manifest_diff(manifests: list[dict | None]) -> list[tuple[str, list]]:
    """What differs between runs' manifests, as `spec_diff` gives settings: (fact, each run's value)."""
    return spec_diff([manifest_facts(m) for m in manifests], ignore=())
