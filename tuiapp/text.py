"""Runs and samples as text, shared by the app and the CLI. Light on purpose: `cherry --help` imports
it, so nothing heavy (the store, sqlite-utils, pandas) is imported at module level."""

from __future__ import annotations

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
