"""The app with a shared Redis that goes away and comes back: its top bar says so, then recovers."""

from __future__ import annotations

import pytest

from tests.app.app_fixtures import screen_text
from tests.app.test_app import make_app, wait_until
from tests.conftest import url_server


@pytest.mark.asyncio
async def test_the_top_bar_shows_redis_unreachable_and_recovers(home, redis_url, monkeypatch):
    monkeypatch.setenv("CHERRY_REDIS_URL", redis_url)
    app = make_app(home)
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_until(pilot, lambda: app.reads >= 1, what="first read")
        server, args = url_server[redis_url]
        server.terminate()
        server.wait(10)
        await wait_until(pilot, lambda: "Redis unreachable" in screen_text(app), timeout=15, what="the warning")
        assert app.store_problem == "Redis unreachable"

        import subprocess

        url_server[redis_url] = (subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), args)
        reads = app.reads
        await wait_until(pilot, lambda: app.reads > reads, timeout=15, what="a read after Redis returned")
        await pilot.pause(0.2)
        assert "Redis unreachable" not in screen_text(app) and app.store_problem is None
