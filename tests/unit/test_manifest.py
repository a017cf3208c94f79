"""Run manifests: what they record, never failing a run, and how runs' manifests are compared."""

from __future__ import annotations

import re

import pytest

from engine.errors import SpecError
from engine.manifest import package_versions, project_commit
from engine.spec import resolve_spec
from tuiapp.text import manifest_diff, manifest_facts


def test_versions_and_the_checkouts_commit_are_read():
    versions = package_versions()
    assert set(versions) == {"python", "torch", "transformers", "peft", "datasets", "cherry"}
    assert versions["torch"] and re.fullmatch(r"\d+\.\d+\.\d+", versions["python"])
    commit = project_commit()  # the tests run from a checkout
    assert commit is not None and re.fullmatch(r"[0-9a-f]{40}", commit["sha"]) and commit["dirty"] in (True, False)


def test_no_git_means_no_commit_not_a_failure(monkeypatch, tmp_path):
    import engine.manifest as manifest

    monkeypatch.setattr(manifest, "PROJECT_ROOT", tmp_path)  # an installed package: no .git beside it
    assert manifest.project_commit() is None
    (tmp_path / ".git").write_text("gitdir: /nowhere\n")  # a broken worktree link
    assert manifest.project_commit() is None


def manifest(**changes) -> dict:
    base = {
        "written_at": 1.0,
        "packages": {"python": "3.11.7", "torch": "2.13.0", "transformers": "5.0"},
        "commit": {"sha": "a" * 40, "dirty": False},
        "data": {
            "fingerprint": "f" * 64,
            "sources": [{"name": "d.jsonl"}],
            "rows": {"rows": 10, "train": 9, "eval": 1},
        },
        "seed": 0,
        "device": {"device": "cuda:0", "name": "H100", "world_size": 1},
        "precision": {"dtype": "bfloat16"},
        "determinism": {"deterministic_algorithms": False},
    }
    for key, value in changes.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) else value
    return base


def test_compared_manifests_list_the_facts_that_differ_not_when_they_were_written():
    a = manifest()
    assert manifest_diff([a, {**manifest(), "written_at": 2.0}]) == []
    b = manifest(packages={"torch": "2.14.0"}, commit={"dirty": True}, device={"name": "A100"})
    assert manifest_diff([a, b]) == [
        ("packages.torch", ["2.13.0", "2.14.0"]),
        ("commit", ["a" * 12, "a" * 12 + "+changes"]),
        ("device.name", ["H100", "A100"]),
    ]
    c = manifest(commit=None, data={"fingerprint": "0" * 64, "rows": {"rows": 10, "train": 8, "eval": 2}})
    assert [key for key, _ in manifest_diff([a, c])] == ["commit", "data.fingerprint", "data.train", "data.eval"]
    assert manifest_facts(None) == {} and manifest_diff([a, None])[0] == ("packages.python", ["3.11.7", None])


@pytest.mark.parametrize("value, kept", [("all", "all"), ("off", "off"), ("16", 16), ("no", "off")])
def test_log_rollouts_takes_all_off_or_a_count(value, kept):
    spec = resolve_spec("grpo", [f"log_rollouts={value}"], model="m", dataset="d", check_paths=False)
    assert spec.log_rollouts == kept


@pytest.mark.parametrize("value", ["0", "some", "2.5", "on"])
def test_log_rollouts_refuses_anything_else_naming_the_field(value):
    with pytest.raises(SpecError, match="log_rollouts must be all, off or a number of samples per step") as err:
        resolve_spec("grpo", [f"log_rollouts={value}"], model="m", dataset="d", check_paths=False)
    assert err.value.field == "log_rollouts"


def test_log_rollouts_is_refused_for_offline_methods_that_would_ignore_it():
    with pytest.raises(SpecError, match="log_rollouts"):
        resolve_spec("dpo", ["log_rollouts=4"], model="m", dataset="d", check_paths=False)
