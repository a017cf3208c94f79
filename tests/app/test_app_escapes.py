"""Terminal escapes and Rich markup in what runs, data and models wrote reach the screen inert: shown
escaped, as plain text, never acted on (issue 33). The delete dialog included."""

from __future__ import annotations

import pytest

from jobs.home import store_path
from jobs.store import Store, StoreReporter
from tests.app.app_fixtures import DEMO_SPEC, screen_text
from tests.app.test_app import make_app, wait_until

OSC_TITLE = "\x1b]0;pwned\x07"  # sets the window title
OSC_CLIPBOARD = "\x1b]52;c;ZXZpbA==\x07"  # writes the clipboard
EVIL_NAME = f"evil{OSC_TITLE}[/][@click=app.quit]click me[/]"
EVIL_DIR = "/tmp/a[/]b[@click=app.quit]c"
RUN_ID = "20260101-000000-evil"


@pytest.fixture
def evil_run(home):
    store = Store(store_path(home))
    try:
        store.create_run(RUN_ID, {**DEMO_SPEC, "name": EVIL_NAME}, name=EVIL_NAME, out_dir=EVIL_DIR)
        rep = StoreReporter(store, RUN_ID)
        rep.log_event("start", f"started {OSC_CLIPBOARD}[bold red]loud[/]", total_steps=2)
        rep.log_samples(
            1,
            [
                {
                    "prompt": f"[@click=app.quit]x[/]row{OSC_CLIPBOARD}",
                    "reference": "ref\x1b[2J",
                    "policy": "pol[/]",
                    "answer": "a",
                    "reference_score": 0.0,
                    "policy_score": 1.0,
                }
            ],
        )
        store.set_status(RUN_ID, "failed", error=f"boom{OSC_TITLE}[/]")
    finally:
        store.close()
    return RUN_ID


def _segments(app) -> list:
    return [segment for strip in app.screen._compositor.render_strips() for segment in strip]


def assert_inert(app) -> str:
    """No ESC reaches the terminal and no text became a link or an action; returns the screen's text."""
    for segment in _segments(app):
        assert "\x1b" not in segment.text and "\x07" not in segment.text
        style = segment.style
        assert not (style and (style.link or (style.meta or {}).get("@click"))), segment
    return screen_text(app)


@pytest.mark.asyncio
async def test_escapes_and_markup_in_a_run_name_and_a_sample_render_inert(home, evil_run):
    from tuiapp.widgets.runs_table import RunsTable

    app = make_app(home)
    async with app.run_test(size=(160, 45)) as pilot:
        table = app.screen.query_one(RunsTable)
        await wait_until(pilot, lambda: table.row_count == 1, what="the run")
        await wait_until(pilot, lambda: app.snapshot and app.snapshot.detail, what="its detail")
        await pilot.pause(0.3)
        text = assert_inert(app)
        assert "evil\\x1b]0;pwned\\x07" in text  # the name, escaped, in the table and the title
        assert "boom\\x1b]0;pwned\\x07[/]" in text  # its error, markup shown as written

        await pilot.press("2")  # samples
        await wait_until(pilot, lambda: "row\\x1b]52" in screen_text(app), what="the sample")
        text = assert_inert(app)
        assert "[@click=app.quit]x[/]" in text and "ref\\x1b[2J" in text and "pol[/]" in text

        await pilot.press("4")  # spec and events
        await wait_until(pilot, lambda: "[bold red]loud[/]" in screen_text(app), what="the event")
        assert_inert(app)

        await pilot.press("d")  # the delete dialog: a `[/]` in the directory crashed it
        await wait_until(pilot, lambda: "Delete" in screen_text(app), what="the dialog")
        text = assert_inert(app)
        assert EVIL_DIR in text and "evil" not in text.split("Delete")[0][-5:]
        await pilot.press("n")
        await wait_until(pilot, lambda: "Delete" not in screen_text(app), what="the dialog closed")
        assert app.is_running  # no @click=app.quit ran


@pytest.mark.asyncio
async def test_toasts_show_their_text_plainly(home):
    app = make_app(home)
    async with app.run_test(size=(100, 30)) as pilot:
        app.screen.notify(f"no run matches '{OSC_TITLE}[@click=app.quit]x[/]'", severity="error")
        await pilot.pause(0.1)
        (toast,) = list(app._notifications)
        assert toast.markup is False
        assert toast.message == "no run matches '\\x1b]0;pwned\\x07[@click=app.quit]x[/]'"
