"""Type-to-filter pickers (metrics for the charts)."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, SelectionList, Static
from textual.widgets.selection_list import Selection


class MetricPicker(ModalScreen[list[str]]):
    """Type to filter; space / click toggles (or picks, with `multiple=False`); enter confirms."""

    BINDINGS = [
        Binding("escape", "cancel", "cancel"),
        Binding("enter", "confirm", "done", priority=True),
        Binding("down", "to_list", "list", show=False),
    ]

    def __init__(self, names: list[str], chosen: list[str], *, multiple: bool = True, title: str = "Metrics") -> None:
        super().__init__()
        self.names = names
        self.chosen = list(chosen)
        self.multiple = multiple
        self.title_text = title

    def compose(self) -> ComposeResult:
        with Vertical(id="picker", classes="dialog"):
            hint = "space toggles, enter shows them" if self.multiple else "enter picks the highlighted one"
            yield Static(f"{self.title_text}: type to filter; {hint}; esc cancels", classes="dialog-title")
            yield Input(placeholder="filter", id="picker-filter")
            yield SelectionList[str](id="picker-list")

    def on_mount(self) -> None:
        self._fill("")
        self.query_one("#picker-filter", Input).focus()

    def _fill(self, text: str) -> None:
        box = self.query_one("#picker-list", SelectionList)
        box.clear_options()
        words = text.lower().split()
        box.add_options([Selection(n, n, n in self.chosen) for n in self.names if all(w in n.lower() for w in words)])

    @on(Input.Changed, "#picker-filter")
    def _filter(self, event: Input.Changed) -> None:
        self._fill(event.value)

    @on(SelectionList.SelectionToggled, "#picker-list")
    def _toggled(self, event: SelectionList.SelectionToggled) -> None:
        name = event.selection.value
        if name in self.chosen:
            self.chosen.remove(name)
        else:
            self.chosen.append(name)
        if not self.multiple:
            self.dismiss([name])

    def action_to_list(self) -> None:
        self.query_one("#picker-list", SelectionList).focus()

    def action_confirm(self) -> None:
        box = self.query_one("#picker-list", SelectionList)
        if not self.multiple or (not self.chosen and box.option_count):
            index = box.highlighted if box.highlighted is not None else 0
            if box.option_count:
                self.dismiss([box.get_option_at_index(index).value])
                return
        order = {n: i for i, n in enumerate(self.names)}
        self.dismiss(sorted(self.chosen, key=lambda n: order.get(n, 0)))

    def action_cancel(self) -> None:
        self.dismiss(None)
