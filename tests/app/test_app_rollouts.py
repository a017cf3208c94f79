"""The Rollouts tab, the labelling mode and rollouts side by side (issue 28), with Pilot on a fixture store
whose GRPO run has 3 stored steps of 2 prompts x 4 samples (tests/app/app_fixtures.py); plus the pure
parts: group statistics, orders, the moved-most ranking, the label files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.home import store_path
from jobs.store import Store
from tests.app.app_fixtures import add_online_run, populate, rollout_records, screen_text
from tests.app.test_app import focus_run, make_app, wait_until
from tuiapp.labels import Candidate, LabelFile, frozen_copy, label_path, record_label, rollout_candidates, ties_path
from tuiapp.rollouts import moved_most, no_rollouts_reason, sorted_groups, sorted_samples, step_groups

# ----------------------------------------------------------------------------- pure parts


def test_groups_flag_zero_variance_and_sort_by_reward_or_advantage():
    groups = step_groups(rollout_records(3))
    assert [g.index for g in groups] == [0, 1]
    sums, solved = groups
    assert sums.mean == pytest.approx(0.25) and not sums.zero_variance
    assert solved.mean == 1.0 and solved.zero_variance  # every sample right: nothing to learn
    assert [s["sample"] for s in sorted_samples(sums.samples, "reward")][0] == 0  # the one right answer first
    assert [s["sample"] for s in sorted_samples(sums.samples, "sample")] == [0, 1, 2, 3]
    assert [g.index for g in sorted_groups(groups, "reward")] == [1, 0]
    assert [g.index for g in sorted_groups(groups, "advantage")] == [0, 1]  # +1.73 beats all-zero


def test_moved_most_ranks_the_changes_of_the_mean_reward():
    assert moved_most({1: 0.375, 2: 0.75, 3: 0.625}) == [(2, 0.375), (3, -0.125)]
    assert moved_most({5: 1.0}) == []


def test_no_rollouts_reason_names_the_cause():
    assert "offline" in no_rollouts_reason("dpo", {}, "completed", "")
    assert "log_rollouts: off" in no_rollouts_reason("grpo", {"log_rollouts": "off"}, "completed", "")
    assert "not kept" in no_rollouts_reason("grpo", {"log_rollouts": False}, "running", "")
    assert "yet" in no_rollouts_reason("grpo", {}, "running", "")
    assert "other machine" in no_rollouts_reason("grpo", {}, "completed", "gpu-2:/runs/x")


def candidate(n: int = 0) -> Candidate:
    return Candidate(f"p{n}", "good", "bad", "rollouts", "run-a", 3, f"g{n}s0", "run-a", 3, f"g{n}s1")


def test_labels_are_on_disk_at_once_ties_apart_and_a_torn_line_is_cut(tmp_path):
    path = label_path(tmp_path, "my set/1")
    assert path == tmp_path / "labels" / "my-set-1.jsonl"
    record_label(path, candidate(0), "b", now=0.0)
    row = json.loads(path.read_text())  # readable by another process before anything else happens
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("p0", "bad", "good")
    assert row["provenance"] == {
        "source": "rollouts",
        "choice": "b",
        "a": {"run": "run-a", "step": 3, "sample": "g0s0"},
        "b": {"run": "run-a", "step": 3, "sample": "g0s1"},
        "labelled_at": "1970-01-01T00:00:00Z",
    }
    record_label(path, candidate(1), "tie", now=0.0)
    assert len(path.read_text().splitlines()) == 1  # a tie is not a training row
    assert json.loads(ties_path(path).read_text())["a"] == "good"
    with open(path, "a") as f:
        f.write('{"prompt": "p2", "cho')  # a crash in the middle of a write
    labels = LabelFile(path)
    assert (labels.pairs, labels.ties) == (1, 1)
    assert labels.done == {candidate(0).key, candidate(1).key}
    labels.record(candidate(2), "a", now=0.0)
    assert [json.loads(line)["prompt"] for line in path.read_text().splitlines()] == ["p0", "p2"]
    frozen = frozen_copy(path)
    assert frozen.name == "my-set-1.first2.jsonl" and frozen.read_text() == path.read_text()
    labels.record(candidate(3), "a", now=0.0)
    assert frozen.read_text() != path.read_text()  # the copy a queued run trains on does not grow


def test_the_label_file_loads_with_datasets(tmp_path):
    from datasets import load_dataset

    path = label_path(tmp_path, "set")
    for n, verdict in enumerate(("a", "b", "a")):
        record_label(path, candidate(n), verdict, now=float(n))
    rows = load_dataset("json", data_files=str(path), split="train")
    assert rows.column_names == ["prompt", "chosen", "rejected", "provenance"]
    assert rows[1]["chosen"] == "bad" and rows[2]["provenance"]["a"]["sample"] == "g2s0"


def test_rollout_candidates_pair_samples_in_drawn_order_and_skip_identical_ones():
    pairs = rollout_candidates("run", step_groups(rollout_records(1)))
    assert [(c.a, c.b, c.sample_a, c.sample_b) for c in pairs] == [
        ("21", "12", "g0s0", "g0s1"),
        ("22", "19", "g0s2", "g0s3"),
        ("4", "5", "g1s0", "g1s1"),
        ("22", "4", "g1s2", "g1s3"),
    ]
    assert rollout_candidates("run", step_groups(rollout_records(3))) == [
        Candidate("<|user|>12+9=<|assistant|>", "21", "12", "rollouts", "run", 3, "g0s0", "run", 3, "g0s1")
    ]  # 31 vs 31 and the all-"4" group give nothing to choose between


# ----------------------------------------------------------------------------- Pilot


@pytest.fixture
def online(home) -> dict[str, str]:
    ids = populate(home)
    ids["grpo"] = add_online_run(home)
    return ids


@pytest.mark.asyncio
@pytest.mark.parametrize("size", [(120, 40), (80, 24)])
async def test_rollouts_tab_steps_sorts_and_jumps(home, online, size):
    app = make_app(home)
    async with app.run_test(size=size) as pilot:
        await focus_run(pilot, online["grpo"])
        await pilot.press("enter", "5")
        await wait_until(pilot, lambda: "step 3 (3/3," in screen_text(app), what="the newest step")
        text = screen_text(app)
        assert "1 zero-variance" in text and "12+9=" in text and "<|user|>" not in text
        assert "+1.73" in text and "#0" in text and "#3" in text
        if size == (120, 40):  # the samples side by side, the all-solved group below the first
            assert "adv +1.73" in text and "⚠ zero variance" in text
        await pilot.press("left")
        await wait_until(pilot, lambda: "step 2 (2/3," in screen_text(app), what="the step before")
        assert "zero-variance" not in screen_text(app)
        await pilot.press("o")
        await wait_until(pilot, lambda: "sort: reward" in screen_text(app), what="sorted by reward")
        await pilot.press("right", "j")  # the largest move of the mean reward: 0.375 -> 0.75 at step 2
        await wait_until(pilot, lambda: "moved most (j): 2 +0.375" in screen_text(app), what="the ranking")
        await wait_until(pilot, lambda: "step 2 (2/3" in screen_text(app), what="the jump")
        await pilot.press("j")
        await wait_until(pilot, lambda: "step 3 (3/3" in screen_text(app), what="the next jump")


@pytest.mark.asyncio
async def test_rollouts_tab_says_why_a_run_has_none(home, online):
    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        await focus_run(pilot, online["done"])
        await pilot.press("5")
        await wait_until(pilot, lambda: "offline method" in screen_text(app), what="the reason")
        await focus_run(pilot, online["grpo"])
        await wait_until(pilot, lambda: "step 3 (3/3" in screen_text(app), what="the online run's rollouts")


async def open_labels(pilot, run_id: str, step_keys: tuple[str, ...] = ("left", "left")):
    from tuiapp.screens.label import LabelScreen

    await focus_run(pilot, run_id)
    await pilot.press("5")
    await wait_until(pilot, lambda: "step 3 (3/3" in screen_text(pilot.app), what="rollouts")
    await pilot.press(*step_keys)
    await wait_until(pilot, lambda: "step 1 (1/3" in screen_text(pilot.app), what="step 1")
    await pilot.press("L")
    await wait_until(
        pilot,
        lambda: isinstance(pilot.app.screen, LabelScreen) and "so far" in screen_text(pilot.app),
        what="the labelling screen",
    )


@pytest.mark.asyncio
async def test_labels_are_written_at_once_kept_across_reopen_and_train_a_run(home, online):
    path = home / "labels" / "grpo-math.jsonl"
    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        await open_labels(pilot, online["grpo"])
        text = screen_text(pilot.app)
        assert "0 pairs, 0 ties so far" in text and "4 left of 4" in text and "labels/grpo-math.jsonl" in text
        assert "A g0s0 · step 1" in text and "B g0s1 · step 1" in text
        await pilot.press("a")
        await wait_until(pilot, lambda: "1 pair, 0 ties" in screen_text(pilot.app), what="the count")
        row = json.loads(path.read_text())  # on disk while the app still runs
        assert (row["chosen"], row["rejected"], row["provenance"]["a"]["step"]) == ("21", "12", 1)
        await pilot.press("t", "s")  # a tie (kept apart), then skip the third pair
        await wait_until(pilot, lambda: "1 pair, 1 tie so far" in screen_text(pilot.app), what="the tie")
        assert json.loads(ties_path(path).read_text())["a"] == "22"
    app = make_app(home)  # reopened: the count so far, and only the pairs not labelled yet (the skipped one again)
    async with app.run_test(size=(120, 40)) as pilot:
        await open_labels(pilot, online["grpo"])
        text = screen_text(pilot.app)
        assert "1 pair, 1 tie so far" in text and "2 left of 4 (2 labelled before)" in text
        assert "A g1s0 · step 1" in text
        await pilot.press("b")
        await wait_until(pilot, lambda: "2 pairs, 1 tie" in screen_text(pilot.app), what="the second pair")
        await pilot.press("D")
        await wait_until(pilot, lambda: len(queued_runs(home)) == 2, what="the DPO run")  # orpo-next + the new one
    run = next(r for r in queued_runs(home) if r.spec["algorithm"] == "dpo")
    assert run.spec["dataset"] == str(home / "labels" / "grpo-math.first2.jsonl")
    assert run.spec["name"] == "grpo-math-dpo"
    rows = [json.loads(line) for line in Path(run.spec["dataset"]).read_text().splitlines()]
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("21", "12"), ("5", "4")]


def queued_runs(home: Path) -> list:
    store = Store(store_path(home))
    try:
        return [r for r in store.list_runs() if r.status == "queued"]
    finally:
        store.close()


@pytest.mark.asyncio
async def test_label_eval_samples_of_a_step(home, online):
    """From the Samples tab, L labels the reference's answer against the policy's where they differ."""
    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        await focus_run(pilot, online["done"])
        await pilot.press("2")
        await wait_until(pilot, lambda: "47+38=" in screen_text(app), what="samples")
        await pilot.press("L")
        await wait_until(pilot, lambda: "1 left of 1" in screen_text(app), what="one differing pair")
        await pilot.press("b")
        await wait_until(pilot, lambda: "nothing left to label" in screen_text(app), what="done")
    row = json.loads((home / "labels" / "dpo-beta01.jsonl").read_text())
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("47+38=", "85", "75")
    assert row["provenance"]["a"] == {"run": online["done"], "step": 40, "sample": "reference"}


@pytest.mark.asyncio
async def test_rollouts_of_two_steps_and_of_two_runs_side_by_side(home, online):
    from tuiapp.screens.rollout_compare import RolloutCompareScreen

    other = add_online_run(home, name="grpo-other", index=1)
    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        await focus_run(pilot, online["grpo"])
        await pilot.press("5")
        await wait_until(pilot, lambda: "step 3 (3/3" in screen_text(app), what="rollouts")
        await pilot.press("w")  # this step against the one before
        await wait_until(pilot, lambda: "2 shared prompts" in screen_text(app), what="steps 2 and 3")
        text = screen_text(app)
        assert "step 2 (2/3" in text and "step 3 (3/3" in text
        await pilot.press("left_square_bracket")
        await wait_until(pilot, lambda: "step 1 (1/3" in screen_text(app), what="A one step older")
        await pilot.press("escape", "escape", "space", "up", "space", "v", "r")  # select both runs, compare
        await wait_until(
            pilot,
            lambda: isinstance(app.screen, RolloutCompareScreen) and "2 shared prompts" in screen_text(app),
            what="two runs' rollouts",
        )
        assert "grpo-other" in screen_text(app) and {s[0] for s in app.screen.sides} == {online["grpo"], other}
