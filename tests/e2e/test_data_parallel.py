"""Data-parallel runs (`num_processes: N`) on the CPU with gloo: two processes with batch B each are the same
run as one process with batch 2B (per-step loss and final weights), for a pair-mean loss (DPO) and a
token-mean loss whose ranks hold different token counts (SFT); online methods run sharded end to end;
cancel and resume work, across world sizes when the global batch is kept. Each runs with every rank holding
the whole model (`parallelism: ddp`) and with each holding a shard of it (`fsdp`).

One process scores each pair's prompt once (engine/shared_prompts.py), and so does each `ddp` rank; a sharded
model scores full rows (its head is gathered only inside its own forward): the `fsdp` runs also check that the
shared-prompt path trains exactly as the full rows do, and that SFT's packed rows (engine/packing.py) train
exactly as padded ones do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.distributed import World, merge_metric_sums
from engine.errors import CherryError
from engine.reporting import MemoryReporter
from engine.rollout import Rollout, merge_rollouts
from engine.spec import build_spec
from engine.train import train
from tests.conftest import write_jsonl
from tests.e2e.test_online import online_spec
from tests.e2e.test_train import dpo_spec

# lr 1e-4: the gradients of one and two processes differ only by float summation order (~1e-7), but Adam
# divides by sqrt(v), so at a large lr a weight whose gradient is near zero moves by ~lr either way and
# the final weights differ by that rounding (measured: 9e-5 at lr 5e-3, 2e-6 at lr 1e-4).
QUIET = dict(eval_steps=0, sample_steps=0, eval_split=0.0, warmup_ratio=0.0, save_steps=100, lr=1e-4)


def _final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def _assert_same_run(one: tuple, two: tuple) -> None:
    (losses_1, weights_1), (losses_2, weights_2) = one, two
    assert len(losses_1) == len(losses_2) > 0
    assert losses_2 == pytest.approx(losses_1, abs=1e-5)
    assert weights_1.keys() == weights_2.keys()
    for name in weights_1:
        assert torch.allclose(weights_1[name], weights_2[name], atol=1e-5), name


def _run(spec, out_dir, **kwargs) -> tuple[list[float], dict[str, torch.Tensor], MemoryReporter, dict]:
    reporter = MemoryReporter()
    summary = train(spec, out_dir, reporter, **kwargs)
    return reporter.series("train/loss"), _final_weights(out_dir), reporter, summary


PARALLELISM = pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])


@PARALLELISM
def test_dpo_on_two_processes_equals_one_process_with_the_global_batch(
    tiny_model_dir, tiny_pairs, tmp_path, parallelism
):
    one = _run(dpo_spec(tiny_model_dir, tiny_pairs, batch_size=8, max_steps=5, **QUIET), tmp_path / "one")
    two = _run(
        dpo_spec(
            tiny_model_dir, tiny_pairs, batch_size=4, num_processes=2, parallelism=parallelism, max_steps=5, **QUIET
        ),
        tmp_path / "two",
    )
    _assert_same_run(one[:2], two[:2])
    assert one[3]["world_size"] == 1 and two[3]["world_size"] == 2
    # weights + AdamW state per rank: whole under ddp, half (give or take a row of padding) under fsdp
    held = two[3]["held_state_gb"] / one[3]["held_state_gb"]
    assert held == pytest.approx(1.0 if parallelism == "ddp" else 0.5, abs=0.02)
    assert two[3]["tokens"] == one[3]["tokens"]  # tokens are counted over both ranks
    assert one[0][-1] < one[0][0] - 0.01  # it trained: the equality is not between two runs that did nothing
    assert (tmp_path / "two" / "ranks" / "rank-1.log").exists()
    assert not (tmp_path / "two" / "ranks" / "metrics.jsonl").exists()  # rank 1 writes no run files


def test_kto_on_two_sharded_processes_equals_one_process(tiny_model_dir, tiny_pairs, tmp_path):
    """One process: each example and its KL row on one prompt pass, the KL rows without gradient; sharded:
    full rows, the KL rows in a second forward under no_grad. The same run either way."""
    one = _run(
        dpo_spec(tiny_model_dir, tiny_pairs, algorithm="kto", batch_size=8, max_steps=4, **QUIET), tmp_path / "1"
    )
    sharded = _run(
        dpo_spec(
            tiny_model_dir,
            tiny_pairs,
            algorithm="kto",
            batch_size=4,
            num_processes=2,
            parallelism="fsdp",
            max_steps=4,
            **QUIET,
        ),
        tmp_path / "2",
    )
    _assert_same_run(one[:2], sharded[:2])
    assert one[0][-1] < one[0][0]


def test_a_sharded_reward_model_equals_one_process(tiny_model_dir, tiny_pairs, tmp_path):
    """A reward model reads its score head at each row's last token; sharded, the head's weights live in
    the root unit, gathered only inside the model's own forward and again for its backward."""
    one = _run(dpo_spec(tiny_model_dir, tiny_pairs, algorithm="rm", batch_size=8, max_steps=4, **QUIET), tmp_path / "1")
    sharded = _run(
        dpo_spec(
            tiny_model_dir,
            tiny_pairs,
            algorithm="rm",
            batch_size=4,
            num_processes=2,
            parallelism="fsdp",
            max_steps=4,
            **QUIET,
        ),
        tmp_path / "2",
    )
    _assert_same_run(one[:2], sharded[:2])
    assert one[0][-1] < one[0][0]


@pytest.fixture(scope="module")
def uneven_sft(tmp_path_factory):
    """Completions from 1 to 12 tokens long, so the two ranks of a step hold different token counts: a mean
    of per-rank token means would differ from the token mean of the global batch."""
    rows = [
        {"prompt": f"say {'abcdef'[i % 6]}:", "completion": " " + "xyzw"[i % 4] * (1 + (i * 5) % 12)} for i in range(32)
    ]
    return write_jsonl(tmp_path_factory.mktemp("sft") / "sft.jsonl", rows)


@PARALLELISM
def test_sft_token_mean_is_global_across_processes(tiny_model_dir, uneven_sft, tmp_path, parallelism):
    def spec(**overrides):
        return dpo_spec(tiny_model_dir, uneven_sft, algorithm="sft", max_steps=4, **QUIET, **overrides)

    one = _run(spec(batch_size=8), tmp_path / "one")
    two = _run(spec(batch_size=4, num_processes=2, parallelism=parallelism), tmp_path / "two")
    _assert_same_run(one[:2], two[:2])
    # one process and each ddp rank pack their rows (no padding in the body); a sharded model runs them
    # padded: the fsdp run also checks that packed rows train exactly as padded ones do
    assert one[2].series("batch/pad_fraction") == [0.0] * 4
    padding = two[2].series("batch/pad_fraction")
    assert padding == [0.0] * 4 if parallelism == "ddp" else all(value > 0.1 for value in padding)
    # and with gradient accumulation on top: 2 processes x 2 micro-batches x 2 rows = 1 process x 8 rows
    accumulated = _run(
        spec(batch_size=2, grad_accum=2, num_processes=2, parallelism=parallelism), tmp_path / "accumulated"
    )
    _assert_same_run(one[:2], accumulated[:2])


def test_a_sharded_rank_with_an_empty_share_runs_a_filler_and_the_run_stays_exact(tiny_model_dir, tmp_path):
    """7 rows, global micro-batches of 2, 2 per step: the second step's last micro-batch has one row, so rank
    1's share is empty. Under fsdp it must still run that micro-batch's passes (each is a collective); the
    filler adds nothing, so the run equals one process's."""
    rows = [{"prompt": f"say {c}:", "completion": " " + c * (1 + i % 4)} for i, c in enumerate("abcdefg")]
    data = write_jsonl(tmp_path / "seven.jsonl", rows)

    def spec(**overrides):
        return dpo_spec(
            tiny_model_dir, data, algorithm="sft", epochs=1, max_steps=0, grad_accum=2, **QUIET, **overrides
        )

    one = _run(spec(batch_size=2), tmp_path / "one")
    sharded = _run(spec(batch_size=1, num_processes=2, parallelism="fsdp"), tmp_path / "sharded")
    assert len(one[0]) == 2
    _assert_same_run(one[:2], sharded[:2])
    assert sharded[3]["tokens"] == one[3]["tokens"]  # the filler's tokens are not counted


@PARALLELISM
def test_grpo_on_two_processes_runs_and_logs_the_same_metrics(tiny_model_dir, tmp_path, parallelism):
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": f"say {c}{i}:", "answer": c * 2} for i, c in enumerate("abcdefghijkl")]
    )
    names, rows, kept = {}, {}, {}
    for processes in (1, 2):
        reporter = MemoryReporter()
        spec = online_spec(
            tiny_model_dir,
            prompts,
            "grpo",
            batch_size=2 if processes == 2 else 4,
            num_processes=processes,
            **({"parallelism": parallelism} if processes == 2 else {}),
        )
        summary = train(spec, tmp_path / f"p{processes}", reporter)
        assert summary["status"] == "completed" and summary["world_size"] == processes
        # gen/length_terminated_mean is logged only on steps where some sample ended (drew EOS), which
        # depends on the tokens each run's seed draws, not on the number of processes
        names[processes] = {name for row in reporter.metrics for name in row} - {"gen/length_terminated_mean"}
        rows[processes] = reporter.series("train/rows")
        kept[processes] = [sum(r["step"] == step for r in reporter.rollouts) for step in (1, 2, 3)]
    assert names[1] == names[2]
    # every step trains on all the step's samples (9 train prompts: 4 + 4 + 1, x 4 samples), gathered
    # from both ranks, including the last step, where one rank had no prompt at all; rank 0 keeps them all
    assert rows[1] == rows[2] == kept[1] == kept[2] == [16, 16, 4]


@PARALLELISM
def test_a_two_process_run_cancels_and_resumes_across_world_sizes(tiny_model_dir, tiny_pairs, tmp_path, parallelism):
    """A sharded run's checkpoint has the same format as a one-process run's: it resumes on one process."""
    whole = _run(dpo_spec(tiny_model_dir, tiny_pairs, batch_size=8, max_steps=6, **QUIET), tmp_path / "whole")

    calls = []

    def stop_after_three():
        calls.append(1)
        return len(calls) > 3

    run_dir = tmp_path / "run"
    two = dpo_spec(
        tiny_model_dir, tiny_pairs, batch_size=4, num_processes=2, parallelism=parallelism, max_steps=6, **QUIET
    )
    first = MemoryReporter()
    summary = train(two, run_dir, first, should_stop=stop_after_three)
    assert summary["status"] == "cancelled" and summary["step"] == 3

    # another global batch would change which examples each step sees: refused, naming the settings
    wrong = dpo_spec(
        tiny_model_dir, tiny_pairs, batch_size=8, num_processes=2, parallelism=parallelism, max_steps=6, **QUIET
    )
    with pytest.raises(CherryError, match="global batch of 8"):
        train(wrong, run_dir, MemoryReporter(), resume=True)

    # the same global batch on one process continues the run exactly
    one = dpo_spec(tiny_model_dir, tiny_pairs, batch_size=8, max_steps=6, **QUIET)
    rest = MemoryReporter()
    summary = train(one, run_dir, rest, resume=True)
    assert summary["status"] == "completed" and summary["step"] == 6
    assert any("resumed with 1 process" in e["message"] for e in rest.events)
    losses = first.series("train/loss") + rest.series("train/loss")
    assert losses == pytest.approx(whole[0], abs=1e-5)
    weights = _final_weights(run_dir)
    assert all(torch.allclose(weights[n], whole[1][n], atol=1e-5) for n in weights)


def test_a_one_process_checkpoint_resumes_sharded(tiny_model_dir, tiny_pairs, tmp_path):
    """The other way: a run that outgrew one GPU continues from its checkpoint with fsdp on two processes,
    the optimizer state split between them, and the run is the same as an uninterrupted one."""
    whole = _run(dpo_spec(tiny_model_dir, tiny_pairs, batch_size=8, max_steps=6, **QUIET), tmp_path / "whole")
    calls = []
    run_dir = tmp_path / "run"
    first = MemoryReporter()
    one = dpo_spec(tiny_model_dir, tiny_pairs, batch_size=8, max_steps=6, **QUIET)
    train(one, run_dir, first, should_stop=lambda: calls.append(1) or len(calls) > 3)
    sharded = dpo_spec(
        tiny_model_dir, tiny_pairs, batch_size=4, num_processes=2, parallelism="fsdp", max_steps=6, **QUIET
    )
    rest = MemoryReporter()
    summary = train(sharded, run_dir, rest, resume=True)
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert first.series("train/loss") + rest.series("train/loss") == pytest.approx(whole[0], abs=1e-5)
    weights = _final_weights(run_dir)
    assert all(torch.allclose(weights[n], whole[1][n], atol=1e-5) for n in weights)
    config = (run_dir / "final" / "config.json").read_text()
    assert '"LlamaForCausalLM"' in config  # saved as the model's own class, not the sharding wrapper's


def test_num_processes_is_checked_at_submit():
    with pytest.raises(CherryError, match="num_processes must be >= 1"):
        build_spec({"algorithm": "dpo", "model": "m", "dataset": "d", "num_processes": 0})
    with pytest.raises(CherryError, match="num_processes=2 needs device"):
        build_spec({"algorithm": "dpo", "model": "m", "dataset": "d", "num_processes": 2, "device": "mps"})
    base = {"algorithm": "dpo", "model": "m", "dataset": "d", "parallelism": "fsdp"}
    with pytest.raises(CherryError, match="parallelism fsdp shards the model over num_processes"):
        build_spec(base)
    with pytest.raises(CherryError, match="use --set parallelism=ddp, or --set lora.r=0"):
        build_spec({**base, "num_processes": 2, "lora": {"r": 8}})
    with pytest.raises(CherryError, match="use --set dtype=bf16"):
        build_spec({**base, "num_processes": 2, "dtype": "fp16", "device": "cuda"})
    with pytest.raises(CherryError, match="parallelism must be one of ddp, fsdp"):
        build_spec({**base, "parallelism": "zero3"})


def test_shards_cover_every_item_once():
    items = list(range(7))
    for size in (1, 2, 3, 8):
        shards = [World(rank, size).shard(items) for rank in range(size)]
        assert sum(shards, []) == items
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_micro_shards_give_an_empty_share_a_filler_only_in_lockstep():
    chunks = [[1, 2], [3]]
    assert World(1, 2).micro_shards(chunks) == [([2], True)]
    assert World(1, 2).micro_shards(chunks, lockstep=True) == [([2], True), ([3], False)]
    assert World(0, 2).micro_shards(chunks, lockstep=True) == [([1], True), ([3], True)]
    assert World().micro_shards(chunks, lockstep=True) == [([1, 2], True), ([3], True)]


def test_metric_sums_and_rollouts_merge_across_ranks():
    sums, counts = merge_metric_sums(
        [({"loss": 2.0, "kto/r": 1.0}, {"loss": 4, "kto/r": 1}), ({"loss": 1.0}, {"loss": 2})]
    )
    assert sums == {"loss": 3.0, "kto/r": 1.0} and counts == {"loss": 6, "kto/r": 1}

    def part(prompt: str, rewards: list[float]) -> Rollout:
        n = len(rewards)
        return Rollout(
            examples=[{"prompt": prompt, "prompt_ids": [1]}] * n,
            completion_ids=[[2, 3]] * n,
            texts=["x"] * n,
            truncated=[False] * n,
            group_size=n,
            seconds=float(n),
            rewards=torch.tensor(rewards),
            components={"length": rewards},
        )

    empty = Rollout(examples=[], completion_ids=[], texts=[], truncated=[], group_size=2)
    merged = merge_rollouts([part("a", [1.0, 2.0]), empty, part("b", [3.0, 4.0])])
    assert merged.prompts == ["a", "a", "b", "b"] and merged.rewards.tolist() == [1, 2, 3, 4]
    assert merged.components == {"length": [1.0, 2.0, 3.0, 4.0]} and merged.seconds == 2.0


def test_a_rank_that_dies_ends_the_run_instead_of_leaving_it_waiting(tiny_model_dir, tiny_pairs, tmp_path):
    """Killing rank 1 mid-run (as the kernel's OOM killer would) ends rank 0 within seconds with rank 1's
    log, instead of leaving it blocked in a collective; the run keeps its metrics and checkpoints."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    command = [sys.executable, "-m", "tuiapp.cli", "train", "--preset", "dpo", "--model", str(tiny_model_dir)]
    command += ["--dataset", str(tiny_pairs), "--out", str(out)]
    for setting in ("num_processes=2", "batch_size=4", "max_steps=100000", "save_steps=2", "eval_steps=0"):
        command += ["--set", setting]
    env = {**os.environ, "CHERRY_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not list((out / "checkpoints").glob("step-*")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert list((out / "checkpoints").glob("step-*")), "the run did not reach its first checkpoint"
        found = subprocess.run(["pgrep", "-f", f"engine.rank .*{out}"], capture_output=True, text=True)
        # the agent gave each rank its RANK; kill rank 1
        rank_1 = [
            pid for pid in found.stdout.split() if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ]
        os.kill(int(rank_1[0]), signal.SIGKILL)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "rank process rank-1 ended with exit code -9" in output
    assert (out / "metrics.jsonl").read_text().strip() and list((out / "checkpoints").glob("step-*"))


def _one_demo_preset_per_algorithm() -> list[str]:
    from engine.spec import demo_dir, resolve_spec

    by_algorithm: dict[str, str] = {}
    for preset in sorted(demo_dir().glob("*.yaml")):
        by_algorithm.setdefault(resolve_spec(str(preset), []).algorithm, preset.stem)
    return sorted(by_algorithm.values())


@pytest.mark.slow
@pytest.mark.parametrize("preset", _one_demo_preset_per_algorithm())
def test_every_method_runs_sharded_on_two_processes(preset, tmp_path, monkeypatch):
    """Every algorithm's passes stay in lockstep under fsdp (a rank that ran one pass more or less would
    wait in a collective until the watchdog): two steps with evaluation, samples and checkpoints."""
    from engine.spec import demo_dir, resolve_spec

    monkeypatch.setenv("CHERRY_DIST_TIMEOUT", "120")
    settings = ["num_samples=2", "kl_samples=2", "max_steps=2", "eval_steps=1", "sample_steps=1", "save_steps=1"]
    settings += ["eval_max_examples=8", "batch_size=2", "num_processes=2", "parallelism=fsdp", "num_threads=1"]
    reporter = MemoryReporter()
    summary = train(resolve_spec(str(demo_dir() / f"{preset}.yaml"), settings), tmp_path / preset, reporter)
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["parallelism"] == "fsdp"
    assert len(reporter.series("train/loss")) == 2 and reporter.samples
