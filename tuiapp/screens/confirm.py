"""Ask once before a destructive action."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static

from tuiapp.text import safe_text


class ConfirmScreen(ModalScreen[bool]):
    """The question and its detail name runs and directories: shown as plain, escaped text, never markup."""

    BINDINGS = [
        Binding("y", "answer(True)", "yes"),
        Binding("n,escape", "answer(False)", "no"),
    ]

    def __init__(self, question: str, detail: str = "") -> None:
        super().__init__()
        self.question = question
        self.detail = detail

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm", classes="dialog"):
            yield Static(Text(safe_text(self.question)), classes="dialog-title")
            if self.detail:
                yield Static(Text(safe_text(self.detail)), classes="dim")
            with Horizontal(classes="buttons"):
                yield Button("No [n]", id="no")
                yield Button("Yes, delete [y]", id="yes", variant="error")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)
