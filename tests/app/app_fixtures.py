"""A run store written directly (no worker, no torch) for the app's display tests.

Every timestamp is fixed relative to `NOW`, so an app given `now=lambda: NOW` shows the same ages,
ETAs and durations on every run (the snapshot tests rely on it).
"""

from __future__ import annotations

import math
from pathlib import Path

from jobs.home import store_path
from jobs.store import Store, StoreReporter

NOW = 1_795_000_000.0  # 2026-11-18 (UTC): "now" for the fixture store and the app under test
DEMO_SPEC = {"algorithm": "dpo", "model": "demo", "dataset": "demo/pairs.jsonl", "beta": 0.1, "lr": 3e-5}


def screen_text(app) -> str:
    """The app's screen as plain text, as a terminal would show it."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


def populate(home: Path, now: float = NOW) -> dict[str, str]:
    """Four runs: a completed DPO run with metrics and samples, a running one, a queued one, a failed one."""
    store = Store(store_path(home))
    ids = {}
    for key, name, algo, status in (
        ("done", "dpo-beta01", "dpo", "completed"),
        ("running", "dpo-beta05", "dpo", "running"),
        ("failed", "kto-try", "kto", "failed"),
        ("queued", "orpo-next", "orpo", "queued"),
    ):
        run_id = f"20260101-00000{len(ids)}-{name}"
        (home / run_id).mkdir(parents=True, exist_ok=True)
        store.create_run(run_id, {**DEMO_SPEC, "algorithm": algo, "name": name}, name=name, out_dir=str(home / run_id))
        ids[key] = run_id
    rep = StoreReporter(store, ids["done"])
    rep.log_event("start", "dpo: 40 steps", total_steps=40)
    for step in range(1, 41):
        rep.log_metrics(
            step,
            {
                "train/loss": 0.69 * math.exp(-step / 20),
                "rewards/margin": step / 10,
                "rewards/accuracy": min(1.0, 0.5 + step / 60),
                "sys/rss_gb": 0.4 + step / 1000,
            },
        )
        if step % 10 == 0:
            rep.log_metrics(step, {"eval/exact_match": 0.475 + step / 400, "kl/mean": step / 50})
    for step in (20, 40):
        rep.log_samples(
            step,
            [
                {
                    "prompt": "47+38=",
                    "reference": "75",
                    "policy": "85" if step == 40 else "75",
                    "answer": "85",
                    "reference_score": 0.0,
                    "policy_score": 1.0 if step == 40 else 0.0,
                },
                {
                    "prompt": "reverse: garden",
                    "reference": "nedrag",
                    "policy": "nedrag",
                    "answer": "nedrag",
                    "reference_score": 1.0,
                    "policy_score": 1.0,
                },
            ],
        )
    store.set_status(ids["done"], "completed")
    (home / ids["done"] / "log.txt").write_text(
        "loading the demo model\nstep 40/40 loss 0.09\ndone: final weights saved\n"
    )

    rep = StoreReporter(store, ids["running"])
    store.set_status(ids["running"], "running")
    rep.log_event("start", "dpo: 100 steps", total_steps=100)
    for step in range(1, 31):
        rep.log_metrics(step, {"train/loss": 0.69 - step / 100, "rewards/margin": step / 20, "kl/mean": step / 40})
    rep.log_metrics(30, {"eval/exact_match": 0.55, "kl/mean": 0.7})
    store.set_status(ids["failed"], "failed", error="dataset: no known dataset format matches the columns found: foo")

    # Fixed times: created (oldest first, as the ids), started, finished, each metric row and event.
    times = {  # key: (created, started, finished, seconds per step)
        "done": (now - 3 * 3600, now - 3 * 3600 + 60, now - 3 * 3600 + 260, 5.0),
        "running": (now - 3600, now - 600, None, 20.0),
        "failed": (now - 2400, None, now - 2390, 1.0),
        "queued": (now - 300, None, None, 1.0),
    }
    for key, (created, started, finished, per_step) in times.items():
        run_id = ids[key]
        store.update_run(run_id, created_at=created, started_at=started, finished_at=finished)
        origin = started or created
        store.db.execute("UPDATE metrics SET time = ? + step * ? WHERE run_id = ?", [origin, per_step, run_id])
        store.db.execute("UPDATE events SET time = ? WHERE run_id = ?", [origin, run_id])
    store.close()
    return ids


def pair_rows(margins: list[float]) -> list[dict]:
    """Preference rows (kind preference) as the engine logs them, one per margin, on fixed pairs."""
    pairs = [("12+9=", "21", "12"), ("reverse: stop", "pots", "stop"), ("3*4=", "12", "7")]
    rows = []
    for (prompt, chosen, rejected), margin in zip(pairs, margins):
        rows.append(
            {
                "kind": "preference",
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "chosen_reward": round(margin / 2, 4),
                "rejected_reward": round(-margin / 2, 4),
                "margin": margin,
            }
        )
    return rows


def add_compare_samples(home: Path, ids: dict[str, str]) -> None:
    """Samples for comparing two runs: the running run logs the done run's prompts (one answered
    differently) plus one of its own at step 30; both log preference pairs beside them."""
    store = Store(store_path(home))
    done = StoreReporter(store, ids["done"])
    done.log_samples(40, pair_rows([0.8, -0.3, 1.5]))
    running = StoreReporter(store, ids["running"])
    running.log_samples(
        10,
        [
            {
                "prompt": "47+38=",
                "reference": "75",
                "policy": "75",
                "answer": "85",
                "reference_score": 0.0,
                "policy_score": 0.0,
            },
            {
                "prompt": "reverse: garden",
                "reference": "nedrag",
                "policy": "nedrag",
                "answer": "nedrag",
                "reference_score": 1.0,
                "policy_score": 1.0,
            },
        ]
        + pair_rows([0.1, -0.2, 0.3]),
    )
    running.log_samples(
        30,
        [
            {
                "prompt": "47+38=",
                "reference": "75",
                "policy": "95",
                "answer": "85",
                "reference_score": 0.0,
                "policy_score": 0.0,
            },
            {
                "prompt": "reverse: garden",
                "reference": "nedrag",
                "policy": "nedrag",
                "answer": "nedrag",
                "reference_score": 1.0,
                "policy_score": 1.0,
            },
            {
                "prompt": "2+2=",
                "reference": "4",
                "policy": "4",
                "answer": "4",
                "reference_score": 1.0,
                "policy_score": 1.0,
            },
        ]
        + pair_rows([0.2, 0.4, -0.1]),
    )
    store.close()


# A 6-point sweep: lr x beta, scored by eval/exact_match (higher is better) at steps 0, 10, 20, 30.
# lr 1e-6 barely moves, 1e-5 learns, 1e-4 learns fast but drifts far (high KL); two runs were pruned.
SWEEP_POINTS = (
    # lr, beta, final exact match, final KL, status, steps run
    ("1e-6", "0.1", 0.49, 0.02, "completed", 30),
    ("1e-6", "0.3", 0.48, 0.01, "pruned", 10),
    ("1e-5", "0.1", 0.62, 0.30, "completed", 30),
    ("1e-5", "0.3", 0.58, 0.12, "completed", 30),
    ("1e-4", "0.1", 0.55, 1.50, "pruned", 20),
    ("1e-4", "0.3", 0.66, 0.90, "completed", 30),
)


def add_experiment(home: Path, name: str = "lr-beta", now: float = NOW) -> list[str]:
    """The sweep above as experiment `name` (created after the fixture's runs, so it sorts first);
    the best run is tagged good and has a note. Returns the run ids in sweep order."""
    store = Store(store_path(home))
    ids = []
    rule = {"rule": "median", "metric": "eval/exact_match", "after": 1, "mode": "max"}
    for i, (lr, beta, final_em, final_kl, status, steps) in enumerate(SWEEP_POINTS):
        run_name = f"{name}-lr{lr}-beta{beta}"
        run_id = f"20260102-00000{i}-{run_name}"
        spec = {**DEMO_SPEC, "name": run_name, "lr": float(lr), "beta": float(beta)}
        store.create_run(
            run_id, spec, name=run_name, out_dir=str(home / run_id), experiment=name,
            swept={"lr": lr, "beta": beta}, prune=rule,
        )  # fmt: skip
        rep = StoreReporter(store, run_id)
        rep.log_event("start", "dpo: 30 steps", total_steps=30)
        for step in range(1, steps + 1):
            progress = step / 30
            rep.log_metrics(step, {"train/loss": 0.69 - (0.69 - 0.2) * progress * (0.2 + i / 8)})
        for step in range(0, steps + 1, 10):
            progress = step / 30
            rep.log_metrics(
                step, {"eval/exact_match": 0.475 + (final_em - 0.475) * progress, "kl/mean": final_kl * progress}
            )
        store.set_status(run_id, status)
        created = now - 1800 + i * 10
        store.update_run(run_id, created_at=created, started_at=created + 5, finished_at=created + 5 + steps * 2)
        store.db.execute("UPDATE metrics SET time = ? + step * 2 WHERE run_id = ?", [created + 5, run_id])
        store.db.execute("UPDATE events SET time = ? WHERE run_id = ?", [created + 5, run_id])
        ids.append(run_id)
    store.set_tags(ids[5], ["good"])
    store.update_run(ids[5], note="best so far: try 2e-4")
    store.close()
    return ids


# A GRPO run's stored rollouts: 3 steps x 2 prompts x 4 samples. The reward (correct answer 1, else 0,
# plus a small format bonus) rises from step 1 to 2 and falls a little at 3; "2+2=" is solved by every
# sample at step 3 (a zero-variance group).
ROLLOUT_COMPLETIONS = {
    1: {"12+9=": ["21", "12", "22", "19"], "2+2=": ["4", "5", "22", "4"]},
    2: {"12+9=": ["21", "21", "22", "21"], "2+2=": ["4", "4", "4", "5"]},
    3: {"12+9=": ["21", "12", "31", "31"], "2+2=": ["4", "4", "4", "4"]},
}
ROLLOUT_ANSWERS = {"12+9=": "21", "2+2=": "4"}


def rollout_records(step: int) -> list[dict]:
    """One step's records in the rollout store's schema (engine/rollout_store.py), advantages group-relative."""
    records = []
    for group, (prompt, completions) in enumerate(ROLLOUT_COMPLETIONS[step].items()):
        rewards = [1.0 if c == ROLLOUT_ANSWERS[prompt] else 0.0 for c in completions]
        mean = sum(rewards) / len(rewards)
        std = (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5
        for sample, (completion, reward) in enumerate(zip(completions, rewards)):
            fmt = 0.1 if len(completion) <= 2 else 0.0
            records.append(
                {
                    "step": step,
                    "group": group,
                    "sample": sample,
                    "prompt": f"<|user|>{prompt}<|assistant|>",
                    "messages": None,
                    "completion": completion,
                    "rewards": {"accuracy": reward, "format": fmt},
                    "reward": reward,
                    "advantage": round((reward - mean) / (std + 1e-4), 4),
                    "kl": 0.01 * step,
                    "logp_mean": -0.5,
                    "length": len(completion) + 1,
                    "truncated": False,
                    "finish": "eos",
                    "judge": None,
                }
            )
    return records


def add_online_run(home: Path, name: str = "grpo-math", index: int = 0, now: float = NOW) -> str:
    """A completed GRPO run (newer than the fixture's runs) with the rollouts above in its store; returns its id."""
    from engine.rollout_store import write_shard

    store = Store(store_path(home))
    run_id = f"20260103-00000{index}-{name}"
    spec = {**DEMO_SPEC, "algorithm": "grpo", "name": name, "dataset": "demo/prompts.jsonl"}
    store.create_run(run_id, spec, name=name, out_dir=str(home / run_id))
    rep = StoreReporter(store, run_id)
    rep.log_event("start", "grpo: 3 steps", total_steps=3)
    for step in ROLLOUT_COMPLETIONS:
        records = rollout_records(step)
        write_shard(home / run_id, step, records)
        rep.log_metrics(step, {"reward/mean": sum(r["reward"] for r in records) / len(records)})
    store.set_status(run_id, "completed")
    store.update_run(run_id, created_at=now - 120 + index, started_at=now - 110, finished_at=now - 60)
    store.db.execute("UPDATE metrics SET time = ? + step * 10 WHERE run_id = ?", [now - 110, run_id])
    store.db.execute("UPDATE events SET time = ? WHERE run_id = ?", [now - 110, run_id])
    store.close()
    return run_id
