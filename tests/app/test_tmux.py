"""`cherry` in a real terminal: a detached tmux session at 80x24, keys sent with `tmux send-keys`,
the screen read with `tmux capture-pane`. Skipped where tmux is not installed (CI installs it)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.app.app_fixtures import populate

TMUX = shutil.which("tmux")
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed")


class Tmux:
    """One private tmux server (its own socket), so a user's sessions are never touched."""

    def __init__(self, where: Path) -> None:
        self.socket = where / "tmux.sock"
        self.env = {**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        self.env.pop("TMUX", None)

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [TMUX, "-u", "-S", str(self.socket), "-f", os.devnull, *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
            timeout=30,
        )

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "cherry").stdout

    def wait_for(self, predicate, what: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if predicate(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the screen:\n{text}")
            time.sleep(0.1)

    def keys(self, *keys: str, literal: bool = False) -> None:
        self("send-keys", "-t", "cherry", *(["-l"] if literal else []), *keys)


def test_cherry_in_tmux_filters_opens_the_form_and_quits():
    where = Path(tempfile.mkdtemp(prefix="cherry-tmux-"))  # short: a socket path has a length limit
    home = where / "home"
    home.mkdir()
    populate(home)
    rc_file = where / "rc"
    env = f"CHERRY_HOME={shlex.quote(str(home))} TERM=xterm-256color LANG=C.UTF-8 LC_ALL=C.UTF-8"
    app = f"cd {shlex.quote(str(ROOT))} && env -u CHERRY_REDIS_URL {env} {shlex.quote(sys.executable)} -m tuiapp.cli"
    tmux = Tmux(where)
    try:
        tmux(
            "new-session",
            "-d",
            "-s",
            "cherry",
            "-x",
            "80",
            "-y",
            "24",
            f"sh -c {shlex.quote(app + f'; echo $? > {shlex.quote(str(rc_file))}')}",
        )
        tmux("set-option", "-s", "escape-time", "0")  # escape is escape, not the start of a sequence
        screen = tmux.wait_for(lambda s: "4 of 4 runs" in s, "the runs table")
        for name in ("orpo-next", "kto-try", "dpo-beta05", "dpo-beta01"):
            assert name in screen
        assert "1 running · 1 queued" in screen and "queue: sqlite" in screen
        assert len(screen.splitlines()[0]) <= 80

        tmux.keys("/", literal=True)
        tmux.wait_for(lambda s: "filter runs" in s, "the filter box")
        tmux.keys("kto", literal=True)
        # the count, the rows and the detail pane of the newly highlighted run repaint apart: wait for all three
        tmux.wait_for(
            lambda s: "1 of 4 runs" in s and "kto-try" in s and "orpo-next" not in s and "filter: /kto" in s,
            "the text filter",
        )
        tmux.keys("Escape")
        tmux.wait_for(lambda s: "4 of 4 runs" in s and "filter:" not in s, "the filter cleared")

        def first_row(screen: str) -> str:
            left = [line[:36] for line in screen.splitlines()]  # the runs pane
            rows = [line for line in left if any(n in line for n in ("orpo-next", "kto-try", "dpo-beta0"))]
            return rows[0] if rows else ""

        tmux.keys("o")  # sort by status: the running run first (the label and the rows may repaint apart)
        tmux.wait_for(lambda s: "sort: status" in s and "dpo-beta05" in first_row(s), "sorted by status")

        tmux.keys("n")
        screen = tmux.wait_for(lambda s: "New run" in s and "Hyper-parameters" in s, "the new-run form")
        assert "demo/dpo" in screen
        tmux.keys("Escape")
        tmux.wait_for(lambda s: "4 of 4 runs" in s, "back on the main screen")

        tmux.keys("q")
        deadline = time.monotonic() + 20
        while not (rc_file.exists() and rc_file.read_text().strip()):
            assert time.monotonic() < deadline, f"cherry did not exit on q; the screen:\n{tmux.screen()}"
            time.sleep(0.1)
        assert rc_file.read_text().strip() == "0"
        deadline = time.monotonic() + 10
        while tmux("has-session", "-t", "cherry", check=False).returncode == 0:  # the pane closed with the app
            assert time.monotonic() < deadline, "the tmux session outlived the app"
            time.sleep(0.1)
    finally:
        tmux("kill-server", check=False)
        shutil.rmtree(where, ignore_errors=True)
