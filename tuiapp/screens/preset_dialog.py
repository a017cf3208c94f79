"""Save the new-run form as a preset of your own, or load one (yours, a path, or any preset name)."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, OptionList, Static
from textual.widgets.option_list import Option

from jobs import CherryError
from tuiapp.user_presets import list_user_presets, presets_home, target_path


class SavePresetDialog(ModalScreen[str | None]):
    """Dismisses with the path to write (asks once before replacing a file), or None."""

    BINDINGS = [Binding("escape", "cancel", "cancel")]

    def __init__(self, home: Path, suggestion: str = "") -> None:
        super().__init__()
        self.home = Path(home)
        self.suggestion = suggestion
        self._replace: Path | None = None  # the existing file a second Save replaces

    def compose(self) -> ComposeResult:
        with Vertical(id="save-preset", classes="dialog"):
            yield Static("Save these settings as a preset", classes="dialog-title")
            yield Static(f"a name (saved in {presets_home(self.home)}/) or a path ending in .yaml", classes="dim")
            yield Input(self.suggestion, placeholder="my-dpo", id="preset-target")
            yield Static(id="preset-msg")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Save", id="save", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#preset-target", Input).focus()

    @on(Input.Changed, "#preset-target")
    def _changed(self) -> None:
        self._replace = None
        self.query_one("#preset-msg", Static).update("")

    @on(Input.Submitted, "#preset-target")
    @on(Button.Pressed, "#save")
    def _save(self) -> None:
        msg = self.query_one("#preset-msg", Static)
        try:
            path = target_path(self.query_one("#preset-target", Input).value, self.home)
        except CherryError as err:
            msg.update(Text("✗ " + str(err), style="red"))
            return
        if path.exists() and path != self._replace:
            self._replace = path
            msg.update(Text(f"{path} exists: Save again to replace it", style="yellow"))
            return
        self.dismiss(str(path))

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class LoadPresetDialog(ModalScreen[str | None]):
    """Dismisses with a preset to load (a saved file's path, or what was typed), or None."""

    BINDINGS = [Binding("escape", "cancel", "cancel")]

    def __init__(self, home: Path) -> None:
        super().__init__()
        self.home = Path(home)
        self.saved = list_user_presets(self.home)

    def compose(self) -> ComposeResult:
        with Vertical(id="load-preset", classes="dialog"):
            yield Static("Load a preset", classes="dialog-title")
            if self.saved:
                yield Static(f"yours, in {presets_home(self.home)}/ (enter loads):", classes="dim")
                yield OptionList(
                    *[
                        Option(
                            Text(path.stem, style="bold") + Text(f"  {desc}" if desc else "", style="dim"), id=str(path)
                        )
                        for desc, path in self.saved
                    ],
                    id="saved-presets",
                )
            else:
                yield Static(
                    f"no presets saved in {presets_home(self.home)}/ yet (f2 in the form saves one)", classes="dim"
                )
            yield Static("or type a path to a .yaml file, or a preset name:", classes="dim")
            yield Input(placeholder="~/presets/mine.yaml", id="preset-source")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Load", id="load", variant="primary")

    def on_mount(self) -> None:
        if self.saved:
            self.query_one("#saved-presets", OptionList).focus()
        else:
            self.query_one("#preset-source", Input).focus()

    @on(OptionList.OptionSelected, "#saved-presets")
    def _picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    @on(Input.Submitted, "#preset-source")
    @on(Button.Pressed, "#load")
    def _load(self) -> None:
        typed = self.query_one("#preset-source", Input).value.strip()
        if typed:
            self.dismiss(str(Path(typed).expanduser()) if typed.endswith((".yaml", ".yml")) else typed)
            return
        if self.saved:
            box = self.query_one("#saved-presets", OptionList)
            if box.highlighted is not None:
                self.dismiss(box.get_option_at_index(box.highlighted).id)
                return
        self.notify("pick a saved preset or type a path", severity="warning")

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
