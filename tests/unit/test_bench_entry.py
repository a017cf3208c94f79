"""`cherry bench` is a thin entry: the harness (benchmarks/) is installed apart from Cherry's packages. With it
installed, the arguments reach its command line; without it, one message gives the install command, exit 2."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from tuiapp.cli import app as cli


def test_without_the_benchmarks_it_says_how_to_install_them(monkeypatch):
    # None in sys.modules makes `import benchmarks.cli` fail as it does where the package is not installed.
    monkeypatch.setitem(sys.modules, "benchmarks", None)
    monkeypatch.setitem(sys.modules, "benchmarks.cli", None)
    for args in (["bench", "dpo", "--shape", "tiny"], ["bench", "--help"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        assert "the benchmarks are not installed" in result.output and "Traceback" not in result.output
        assert "pip install -e ./benchmarks" in result.output and "docs/benchmarks.md" in result.output


def test_with_the_benchmarks_installed_the_arguments_reach_their_command_line(tmp_path):
    result = CliRunner().invoke(cli, ["bench", "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: cherry bench" in result.output
    for command in ("dpo", "grpo", "start", "queue", "gpu"):
        assert command in result.output
    # Found through the install, not because the checkout is the working directory (`python -c` puts the
    # working directory first on sys.path): the harness's child processes run as `python -P -m benchmarks...`.
    found = subprocess.run(
        [sys.executable, "-P", "-c", "import benchmarks.cli, engine; print(benchmarks.cli.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert found.returncode == 0, found.stderr + "\n(install the harness: pip install -e ./benchmarks)"
