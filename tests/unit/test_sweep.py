"""Sweeps on their own: grid and random points, sweep files, tags, and the median early-stopping rule
on a store written directly (no training)."""

from __future__ import annotations

import math

import pytest

from jobs.store import Store
from jobs.sweep import (
    Sweep,
    SweepError,
    halving_verdict,
    load_sweep_file,
    parse_grid,
    parse_ranges,
    points,
    prune_reason,
    prune_rule,
    rung_steps,
    split_grid,
)


def test_a_grid_is_every_combination_in_order():
    grid = parse_grid(["lr=5e-7,1e-6,2e-6", "beta=0.1,0.3"])
    found = points(Sweep(grid=grid))
    assert len(found) == 6
    assert found[0] == {"lr": "5e-7", "beta": "0.1"} and found[1] == {"lr": "5e-7", "beta": "0.3"}
    assert found[-1] == {"lr": "2e-6", "beta": "0.3"}
    with pytest.raises(SweepError, match="lr is given twice"):
        parse_grid(["lr=1", "lr=2"])
    with pytest.raises(SweepError, match="key=values"):
        parse_grid(["lr"])
    with pytest.raises(SweepError, match="nothing to sweep"):
        points(Sweep())


def test_random_draws_are_seeded_and_stay_in_their_ranges():
    values, ranges = split_grid(
        ["lr=log(1e-7,1e-5)", "beta=uniform(0.05,0.5)", "loss_type=choice(sigmoid,ipo)", "seed=1,2"]
    )
    assert values == ["seed=1,2"] and len(ranges) == 3
    sweep = Sweep(grid=parse_grid(values), random=parse_ranges(ranges), count=20, seed=7)
    drawn = points(sweep)
    assert len(drawn) == 40  # 20 draws per grid point
    assert drawn == points(Sweep(grid=parse_grid(values), random=parse_ranges(ranges), count=20, seed=7))
    assert drawn != points(Sweep(grid=parse_grid(values), random=parse_ranges(ranges), count=20, seed=8))
    lrs = [float(p["lr"]) for p in drawn]
    assert all(1e-7 <= lr <= 1e-5 for lr in lrs)
    # log-uniform: about half the draws below the geometric middle (1e-6), not ~10% as uniform would give
    assert 10 <= sum(lr < math.sqrt(1e-7 * 1e-5) for lr in lrs) <= 30
    assert all(0.05 <= float(p["beta"]) <= 0.5 for p in drawn)
    assert {p["loss_type"] for p in drawn} == {"sigmoid", "ipo"}
    with pytest.raises(SweepError, match="log\\(low,high\\)"):
        parse_ranges(["lr=normal(0,1)"])
    with pytest.raises(SweepError, match="low > 0 for log"):
        parse_ranges(["lr=log(0,1)"])
    with pytest.raises(SweepError, match="--random N"):
        points(Sweep(random=parse_ranges(["lr=log(1e-7,1e-5)"])))


def test_a_sweep_file_gives_preset_sets_grid_ranges_and_prune(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "preset: dpo\nmodel: m\ndataset: d\nname: lr-scan\nset: {max_steps: 8}\n"
        "grid: {beta: [0.1, 0.3]}\nrandom: {count: 2, seed: 3, ranges: {lr: 'log(1e-7,1e-5)'}}\n"
        "prune: {rule: median, metric: eval/loss, after: 2}\n"
    )
    sweep = load_sweep_file(path)
    assert (sweep.preset, sweep.model, sweep.dataset, sweep.experiment) == ("dpo", "m", "d", "lr-scan")
    assert sweep.sets == ["max_steps=8"] and sweep.grid == {"beta": ["0.1", "0.3"]}
    assert len(points(sweep)) == 4
    assert sweep.prune == {"rule": "median", "metric": "eval/loss", "after": 2, "mode": "min"}
    path.write_text("grid: {beta: 0.1}\n")
    with pytest.raises(SweepError, match="grid maps each key to a list"):
        load_sweep_file(path)
    path.write_text("grids: {}\n")
    with pytest.raises(SweepError, match="unknown key 'grids'"):
        load_sweep_file(path)


def test_prune_rule_checks_its_settings():
    assert prune_rule("median", "eval/exact_match", 2)["mode"] == "max"
    assert prune_rule("median", "eval/loss", 1)["mode"] == "min"
    with pytest.raises(SweepError, match="--prune-metric"):
        prune_rule("median", None, 1)
    with pytest.raises(SweepError, match="choose from median"):
        prune_rule("hyperband", "eval/loss", 1)


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "store.sqlite")


def _run(store, run_id, values, *, rule=None, experiment="exp"):
    store.create_run(run_id, {"algorithm": "dpo"}, name=run_id, out_dir=None, experiment=experiment, prune=rule)
    for step, value in values.items():
        store.add_metrics(run_id, step, {"eval/loss": value})
    return store.get_run(run_id)


def test_the_median_rule_prunes_a_run_worse_than_the_others_at_the_same_step(store):
    rule = prune_rule("median", "eval/loss", 1)
    _run(store, "a", {0: 0.69, 2: 0.50, 4: 0.40})
    _run(store, "b", {0: 0.69, 2: 0.55})
    _run(store, "other-experiment", {0: 0.69, 2: 0.10}, experiment="elsewhere")
    good = _run(store, "good", {0: 0.69, 2: 0.45}, rule=rule)
    bad = _run(store, "bad", {0: 0.69, 2: 0.68}, rule=rule)
    assert prune_reason(store, good) is None
    reason = prune_reason(store, bad)
    assert "eval/loss 0.68 at step 2 is above the median 0.5" in reason and "experiment exp" in reason
    # only step-0 evals (before training), or fewer eval points than `after`: never pruned
    assert prune_reason(store, _run(store, "fresh", {0: 0.9}, rule=rule)) is None
    patient = _run(store, "patient", {0: 0.69, 2: 0.68}, rule=prune_rule("median", "eval/loss", 2))
    assert prune_reason(store, patient) is None
    # a run ahead of the others is judged at the latest step they reached
    ahead = _run(store, "ahead", {0: 0.69, 2: 0.60, 4: 0.30, 6: 0.2}, rule=rule)
    assert prune_reason(store, ahead) is None  # at step 4 only `a` is there: 0.30 < 0.40
    # higher is better for accuracy-like metrics
    assert prune_reason(store, _run(store, "lonely", {2: 0.1}, rule=rule, experiment="solo")) is None


def test_successive_halving_keeps_the_best_third_at_each_rung():
    assert rung_steps(10, 3, 100) == [10, 30, 90] and rung_steps(10, 2, 9) == []
    # accuracy (max): at rung 10 the run's 0.4 is third of 3 -> ceil(3/3) = 1 kept: pruned
    others = [{10: 0.6, 20: 0.65}, {10: 0.5}]
    verdict = halving_verdict({10: 0.4}, others, eta=3, rung=10, mode="max")
    assert (verdict.step, verdict.rank, verdict.reached, verdict.keep, verdict.kept) == (10, 3, 3, 1, False)
    # the best run goes on; with eta 2, second of 3 is kept too (ceil(3/2) = 2)
    assert halving_verdict({10: 0.7}, others, eta=3, rung=10, mode="max").kept
    assert halving_verdict({10: 0.55}, others, eta=2, rung=10, mode="max").kept
    # before its first rung, and alone at a rung, a run goes on
    assert halving_verdict({5: 0.1}, others, eta=3, rung=10, mode="max") is None
    assert halving_verdict({}, others, eta=3, rung=10, mode="max") is None
    assert halving_verdict({10: 0.1}, [], eta=3, rung=10, mode="max").kept
    # judged at the highest rung reached (30), among the runs that got there; losses: lower is better
    late = halving_verdict({10: 0.3, 30: 0.35}, [{10: 0.5, 30: 0.2}, {10: 0.6}], eta=3, rung=10, mode="min")
    assert (late.step, late.rank, late.reached, late.kept) == (30, 2, 2, False)
    # eval points between rungs: a rung takes the first eval at or past it; default first rung = first eval
    assert halving_verdict({4: 0.9, 8: 0.2}, [{4: 0.5, 8: 0.1}], eta=2, rung=None, mode="min").step == 8
    assert halving_verdict({6: 0.9}, [{4: 0.5, 8: 0.1}], eta=2, rung=5, mode="min").value == 0.9
    # ties rank in the run's favour
    assert halving_verdict({10: 0.5}, [{10: 0.5}], eta=2, rung=10, mode="max").kept


def test_the_halving_rule_reads_the_experiment_from_the_store(store):
    rule = prune_rule("halving", "eval/loss", 1, eta=2, rung=2)
    assert rule == {"rule": "halving", "metric": "eval/loss", "after": 1, "mode": "min", "eta": 2, "rung": 2}
    _run(store, "a", {0: 0.69, 2: 0.50, 4: 0.40})
    _run(store, "b", {0: 0.69, 2: 0.55})
    _run(store, "elsewhere", {2: 0.01}, experiment="other")
    assert prune_reason(store, _run(store, "good", {0: 0.69, 2: 0.45}, rule=rule)) is None
    reason = prune_reason(store, _run(store, "bad", {0: 0.69, 2: 0.60}, rule=rule))
    assert "eval/loss 0.6 at rung step 2 ranks 4 of 4" in reason and "keeps the best 2" in reason
    with pytest.raises(SweepError, match="--prune-eta"):
        prune_rule("halving", "eval/loss", 1, eta=1)
    with pytest.raises(SweepError, match="--prune-rung"):
        prune_rule("halving", "eval/loss", 1, rung=0)


def test_tags_notes_and_sweep_values_are_stored_with_the_run(store):
    store.create_run("r", {"algorithm": "dpo"}, name="r", out_dir=None, experiment="e", swept={"lr": "1e-6"})
    store.set_tags("r", {"good", "baseline"})
    store.update_run("r", note="best so far")
    run = store.get_run("r")
    assert run.tags == ["baseline", "good"] and run.swept == {"lr": "1e-6"}
    assert run.experiment == "e" and run.note == "best so far"
    store.set_tags("r", [])
    assert store.get_run("r").tags == []


def test_every_status_pruned_included_has_a_glyph_and_a_place_in_the_runs_table():
    from jobs.runs import RESUMABLE
    from jobs.store import ENDED, STATUSES
    from tuiapp.data import GLYPHS
    from tuiapp.widgets.runs_table import STATUS_ORDER

    assert set(STATUSES) == set(GLYPHS) == set(STATUS_ORDER)
    assert "pruned" in ENDED and "pruned" in RESUMABLE
