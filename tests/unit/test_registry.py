"""The registry is the one list of algorithms: every row has its class, its loss, its preset and its
README line, and what the rest of the code says about a method comes from its row."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml

from engine.registry import ALGORITHMS, DATA_KINDS, ONLINE_ALGORITHMS, algorithms_for

ROOT = Path(__file__).resolve().parents[2]


def _load(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_row_has_its_algorithm_loss_preset_and_readme_line(name):
    from engine.algorithms.base import Algorithm

    info = ALGORITHMS[name]
    cls = _load(info.implementation)
    # flat: Algorithm, or one shared path between (PairMethod: the pair methods' one forward and split)
    depth = cls.__mro__.index(Algorithm)
    assert issubclass(cls, Algorithm) and depth <= 2, f"{cls} must subclass Algorithm or one shared base of it"
    assert callable(_load(info.loss)), info.loss
    assert info.loss.startswith("engine.losses."), info.loss
    preset = yaml.safe_load((ROOT / "presets" / f"{name}.yaml").read_text())
    assert preset.get("algorithm", name) == name or preset.get("base"), preset
    readme = (ROOT / "README.md").read_text()
    assert re.search(rf"^\| `{name}` \|", readme, re.M), f"README has no table row for `{name}`"
    assert info.data_kind in DATA_KINDS
    # An online method turns rollouts into rows; an offline one must not claim to.
    assert ("prepare" in cls.__dict__) == info.online, name


def test_spec_validation_reads_the_registry():
    from engine.errors import SpecError
    from engine.spec import build_spec

    for name, info in ALGORITHMS.items():
        extra = {"num_generations": 2} if name == "online_dpo" else {}
        spec = build_spec({"algorithm": name, **extra})
        assert spec.loss_type == info.default_loss_type, name
        for loss_type in info.loss_types:
            build_spec({"algorithm": name, "loss_type": loss_type, **extra})
        if "loss_type" in info.settings:  # a method with one loss reads no loss_type at all
            with pytest.raises(SpecError, match="loss_type must be one of"):
                build_spec({"algorithm": name, "loss_type": "nope", **extra})


def test_the_submit_time_data_kinds_match_what_the_loops_prepare():
    from engine.data import PRESETS_FOR_KIND

    for kind in DATA_KINDS:
        assert PRESETS_FOR_KIND[kind] == algorithms_for(kind)
    assert set(ONLINE_ALGORITHMS) == set(algorithms_for("prompt"))


def test_the_app_reads_charts_and_form_fields_from_the_registry():
    from tuiapp.data import default_metrics
    from tuiapp.screens.new_run_fields import method_fields

    assert default_metrics("grpo", ["train/loss", "reward/mean", "kl/mean"]) == ["reward/mean", "kl/mean"]
    assert default_metrics("dpo", ["train/loss", "rewards/margin", "x"]) == ["train/loss", "rewards/margin"]
    assert "judge" in method_fields("online_dpo") and "judge" not in method_fields("grpo")
    assert method_fields("dpo") == () and set(method_fields()) >= {"num_generations", "rewards", "judge"}


def test_no_other_module_lists_the_algorithms():
    """A line quoting three or more different methods outside the registry is a second list."""
    quoted = re.compile(r"""["']([a-z_]+)["']""")
    offenders = []
    for folder in ("engine", "jobs", "tuiapp"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "registry.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                named = {word for word in quoted.findall(line) if word in ALGORITHMS}
                if len(named) >= 3 and not line.lstrip().startswith("#"):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
