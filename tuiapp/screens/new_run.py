"""New run: model, dataset (with a preview), preset, hyper-parameters with the preset's defaults.

Every change is validated at once (torch-free: engine.spec); an error shows next to the field it
names. Submit goes through `Jobs.submit`, exactly like `cherry submit`, whose equivalent command
line the form shows. A list in a numeric field (`lr` = `5e-7,1e-6,2e-6`) makes the form a sweep: one
run per combination of the lists, queued as one experiment through jobs.sweep like `cherry sweep`.
The settings can be saved as a preset of your own (YAML under $CHERRY_HOME/presets/, or any path)
and loaded back.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.suggester import SuggestFromList
from textual.widgets import Button, Footer, Input, Label, Select, Static

from jobs import CherryError
from tuiapp.data import RunInfo
from tuiapp.screens.new_run_fields import (
    EXTRA,
    FORM_FIELDS,
    after_choices,
    dataset_choices,
    dataset_preview,
    defaults_for,
    error_field,
    method_fields,
    model_choices,
    preset_choices,
    preset_description,
    preset_help,
    reads,
    show_value,
    spec_api,
    submit_command,
    sweep_grid,
)
from tuiapp.user_presets import save_preset

LIVE_POINT_CHECKS = 64  # sweep points checked on each keystroke; submit checks every point


class NewRunScreen(Screen[str | None]):
    """Dismisses with the new run's id (or None when cancelled)."""

    BINDINGS = [
        Binding("escape", "cancel", "cancel"),
        Binding("ctrl+s", "submit", "submit"),
        Binding("ctrl+o", "show_command", "show command"),
        Binding("f2", "save_preset", "save preset"),
        Binding("f3", "load_preset", "load preset"),
    ]

    def __init__(self, home: Path, runs: list[RunInfo]) -> None:
        super().__init__()
        self.home = Path(home)
        self.runs = runs
        self.presets = preset_choices(self.home)
        values = [v for _, v in self.presets]
        self.preset = next((p for p in ("demo/dpo", "dpo") if p in values), values[0])
        self.defaults: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.submitting = False

    # ------------------------------------------------------------------ layout

    def _row(self, key: str, label: str, widget, help_text: str = "") -> Horizontal:
        return Horizontal(
            Label(label, classes="field-label"),
            widget,
            Static(help_text, id=f"msg-{key.replace('.', '_')}", classes="field-msg"),
            classes="field",
            id=f"row-{key.replace('.', '_')}",
        )

    def compose(self) -> ComposeResult:
        models = model_choices(self.runs)
        datasets = dataset_choices()
        with VerticalScroll(id="new-run"):
            home = getattr(self.app, "home_label", None) or str(self.home)
            yield Static(Text("New run", style="bold") + Text(f"   home: {home}", style="dim"), id="new-run-title")
            yield self._row(
                "preset",
                "Preset",
                Select(
                    [(label, value) for label, value in self.presets],
                    value=self.preset,
                    allow_blank=False,
                    id="f-preset",
                ),
            )
            yield self._row(
                "model",
                "Model",
                Input(
                    placeholder="demo, a local dir, or a hub id",
                    id="f-model",
                    suggester=SuggestFromList([v for _, v in models], case_sensitive=False),
                ),
            )
            yield Horizontal(
                Label("", classes="field-label"),
                Select(models, prompt="pick a model…", id="pick-model"),
                classes="field picker-row",
            )
            yield self._row(
                "dataset",
                "Dataset",
                Input(
                    placeholder="demo/pairs.jsonl, a local file, or a hub id",
                    id="f-dataset",
                    suggester=SuggestFromList([v for _, v in datasets], case_sensitive=False),
                ),
            )
            yield Horizontal(
                Label("", classes="field-label"),
                Select(datasets, prompt="pick a demo dataset…", id="pick-dataset"),
                classes="field picker-row",
            )
            yield Static(id="dataset-preview")
            yield Static(Text("Hyper-parameters (preset defaults; edit any)", style="bold"), classes="section")
            for key in FORM_FIELDS:
                yield self._row(key, key, Input(id=f"f-{key.replace('.', '_')}", classes="hp"))
            for key in method_fields():
                row = self._row(key, key, Input(id=f"f-{key}", classes="hp"))
                row.add_class("method-field")
                yield row
            yield self._row(
                EXTRA, "more settings", Input(placeholder="key=value key=value (any spec key)", id=f"f-{EXTRA}")
            )
            experiment = self._row(
                "experiment",
                "Experiment",
                Input(placeholder="the sweep's name (default: preset-date)", id="f-experiment"),
                "a list in a numeric field sweeps it: one run per value, grouped as this experiment",
            )
            experiment.display = False  # shown once a field holds a list
            yield experiment
            yield self._row(
                "after",
                "After run",
                Select(after_choices(self.runs), prompt="none (start when a worker is free)", id="f-after"),
            )
            yield Static(id="form-error")
            yield Static(id="command")
            with Horizontal(id="form-buttons"):
                yield Button("Save preset", id="save-preset")
                yield Button("Load preset", id="load-preset")
                yield Button("Show command", id="show-command")
                yield Button("Cancel", id="cancel")
                yield Button("Submit", id="submit", variant="primary")
        yield Footer()

    def on_mount(self) -> None:
        self._load_preset(self.preset)
        self.query_one("#f-model", Input).focus()

    # ------------------------------------------------------------------ values

    @property
    def fields(self) -> tuple[str, ...]:
        """The common fields the preset's method reads and its own (an online method's sampling and rewards)."""
        algorithm = self.defaults.get("algorithm")
        return tuple(key for key in FORM_FIELDS if reads(algorithm, key)) + method_fields(algorithm)

    def _input(self, key: str) -> Input:
        return self.query_one(f"#f-{key.replace('.', '_')}", Input)

    def _load_preset(self, preset: str) -> bool:
        """Fill the form from `preset`; on an error keep the form as it was and say why."""
        try:
            self.defaults = defaults_for(preset)
        except CherryError as err:
            self._set_errors({**self.errors, "preset": str(err)})
            return False
        self.preset = preset
        helps = preset_help(preset)
        shown = self.fields
        for key in FORM_FIELDS + method_fields():
            self.query_one(f"#row-{key.replace('.', '_')}").display = key in shown
        for key in self.fields:
            box = self._input(key)
            box.value = show_value(self.defaults.get(key))
            box.tooltip = helps.get(key)
            self.query_one(f"#msg-{key.replace('.', '_')}", Static).update(Text(helps.get(key, ""), style="dim"))
        for key in ("model", "dataset"):
            if self.defaults.get(key):
                self._input(key).value = show_value(self.defaults[key])
        self.query_one("#msg-preset", Static).update(Text(preset_description(preset), style="dim"))
        self.errors.pop("preset", None)
        self.query_one("#row-preset").remove_class("-invalid")
        self.validate()
        return True

    def grid(self) -> dict[str, list[str]]:
        """The fields swept (a list in a numeric field): key -> values; empty for a single run."""
        values = {key: self._input(key).value.strip() for key in self.fields}
        return sweep_grid({k: v for k, v in values.items() if v != show_value(self.defaults.get(k))}, self.defaults)

    def experiment(self) -> str:
        return self.query_one("#f-experiment", Input).value.strip()

    def sweep(self):
        """The form as a jobs.sweep.Sweep (its fixed settings, the swept lists, the experiment's name)."""
        from jobs.sweep import Sweep

        return Sweep(
            preset=self.preset,
            model=self._input("model").value.strip() or None,
            dataset=self._input("dataset").value.strip() or None,
            sets=self.overrides(),
            grid=self.grid(),
            name=self.experiment() or None,
        )

    def overrides(self) -> list[str]:
        """`key=value` for each field that differs from the preset (what `--set` would carry); swept
        fields are left to the grid."""
        items = []
        grid = self.grid()
        for key in self.fields:
            value = self._input(key).value.strip()
            if value == "" or value == show_value(self.defaults.get(key)) or key in grid:
                continue
            items.append(f"{key}={value}")
        items += shlex.split(self._input(EXTRA).value) if self._input(EXTRA).value.strip() else []
        return items

    def after(self) -> str | None:
        value = self.query_one("#f-after", Select).value
        return value if isinstance(value, str) else None  # the blank choice is a sentinel object

    def build(self, point: dict[str, str] | None = None):
        """The RunSpec of the form (of one sweep point when fields hold lists: the first by default), or
        raise CherryError (paths are checked at submit)."""
        model = self._input("model").value.strip() or None
        dataset = self._input("dataset").value.strip() or None
        if point is None:
            point = {key: values[0] for key, values in self.grid().items()}
        overrides = self.overrides() + [f"{k}={v}" for k, v in point.items()]
        return spec_api().resolve_spec(self.preset, overrides, model=model, dataset=dataset, check_paths=False)

    def _check_points(self) -> None:
        """The sweep's points (the first LIVE_POINT_CHECKS), as `cherry sweep` checks them; submit checks them
        all again. The first bad one raises, naming its values."""
        from jobs.sweep import points

        for point in points(self.sweep())[:LIVE_POINT_CHECKS]:
            try:
                self.build(point)
            except CherryError as err:
                shown = ", ".join(f"{k}={v}" for k, v in point.items())
                raise CherryError(f"{err} (sweep point {shown})") from None

    def validate(self) -> bool:
        """Check the form now; show each error next to its field. True when it would submit."""
        errors: dict[str, str] = {}
        grid = self.grid()
        self.query_one("#row-experiment").display = bool(grid)
        try:
            spec = self.build()
            if grid:
                self._check_points()
        except ValueError as err:  # shlex on a half-typed quote
            errors[EXTRA] = str(err)
            spec = None
        except CherryError as err:
            shown = list(self.fields) + ["model", "dataset"]
            named = getattr(err, "field", None)  # a SpecError names its setting
            key = named if named in shown else error_field(str(err), shown)
            errors[key or "form"] = str(err)
            spec = None
        for key in ("model", "dataset"):
            value = self._input(key).value.strip()
            if key in errors:
                continue
            if not value and not (key == "model" and self.after()):
                errors[key] = f"{key} is not set"
                continue
            if value and not (key == "model" and self.after()):
                try:
                    spec_api().resolve_path(value, key, kind="model" if key == "model" else "data")
                except CherryError as err:
                    errors[key] = str(err)
        if grid and self.after():
            errors["after"] = "a sweep's runs start on their own: clear After run, or the lists, to chain a run"
        self._set_errors(errors)
        self._update_command()
        return not errors and spec is not None

    def _set_errors(self, errors: dict[str, str]) -> None:
        helps = preset_help(self.preset) if self.errors.keys() - errors.keys() else {}
        for key in set(self.errors) | set(errors):
            if key == "form":
                continue
            try:
                msg = self.query_one(f"#msg-{key.replace('.', '_')}", Static)
                row = self.query_one(f"#row-{key.replace('.', '_')}")
            except Exception:
                continue
            if key in errors:
                msg.update(Text("✗ " + errors[key], style="red"))
                row.add_class("-invalid")
            else:
                msg.update(Text(helps.get(key, ""), style="dim"))
                row.remove_class("-invalid")
        self.errors = errors
        self.query_one("#form-error", Static).update(
            Text("✗ " + errors["form"], style="red") if "form" in errors else ""
        )

    def command(self) -> str:
        """The form as one command line: `cherry submit`, or `cherry sweep` when fields hold lists."""
        return submit_command(
            self.preset,
            self._input("model").value.strip(),
            self._input("dataset").value.strip(),
            self.overrides(),
            self.after(),
            self.grid(),
            self.experiment(),
        )

    def _update_command(self) -> None:
        try:
            line = self.command()
        except ValueError:
            line = submit_command(self.preset, "", "", [], None)
        self.query_one("#command", Static).update(Text("$ " + line, style="cyan"))

    # ------------------------------------------------------------------ events

    @on(Select.Changed, "#f-preset")
    def _preset_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, str) and event.value != self.preset:
            if self._load_preset(str(event.value)):
                self._preview()
            else:
                with self.prevent(Select.Changed):
                    event.select.value = self.preset

    @on(Select.Changed, "#pick-model")
    def _model_picked(self, event: Select.Changed) -> None:
        if isinstance(event.value, str):
            self._input("model").value = str(event.value)

    @on(Select.Changed, "#pick-dataset")
    def _dataset_picked(self, event: Select.Changed) -> None:
        if isinstance(event.value, str):
            self._input("dataset").value = str(event.value)

    @on(Select.Changed, "#f-after")
    def _after_changed(self, event: Select.Changed) -> None:
        self.validate()

    @on(Input.Changed)
    def _changed(self, event: Input.Changed) -> None:
        self.validate()
        if event.input.id == "f-dataset":
            self._preview()

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        self.focus_next()

    @on(Button.Pressed, "#submit")
    def _submit_pressed(self) -> None:
        self.action_submit()

    @on(Button.Pressed, "#cancel")
    def _cancel_pressed(self) -> None:
        self.action_cancel()

    @on(Button.Pressed, "#show-command")
    def _show_pressed(self) -> None:
        self.action_show_command()

    @on(Button.Pressed, "#save-preset")
    def _save_pressed(self) -> None:
        self.action_save_preset()

    @on(Button.Pressed, "#load-preset")
    def _load_pressed(self) -> None:
        self.action_load_preset()

    # ------------------------------------------------------------------ presets of your own

    def action_save_preset(self) -> None:
        from tuiapp.screens.preset_dialog import SavePresetDialog

        try:
            spec = self.build()
        except (CherryError, ValueError) as err:
            self.notify(f"fix the form first: {err}", title="not saved", severity="error")
            return
        based_on = self.preset
        name = self._input("name").value.strip() or Path(based_on).stem.replace("/", "-")

        def done(target: str | None) -> None:
            if not target:
                return
            try:
                path = save_preset(spec, Path(target), based_on)
            except OSError as err:
                self.notify(str(err), title="not saved", severity="error")
                return
            self._refresh_presets(str(path))
            self.notify(f"saved {path}; load it here (f3) or `cherry submit --preset {path}`", title="preset saved")

        self.app.push_screen(SavePresetDialog(self.home, f"{name}-mine" if not name.endswith("-mine") else name), done)

    def action_load_preset(self) -> None:
        from tuiapp.screens.preset_dialog import LoadPresetDialog

        def done(preset: str | None) -> None:
            if preset:
                self.load_preset(preset)

        self.app.push_screen(LoadPresetDialog(self.home), done)

    def load_preset(self, preset: str) -> bool:
        """Fill the form from a preset name or YAML file (it joins the preset list)."""
        if not self._load_preset(preset):
            self.notify(self.errors.get("preset", preset), title="not loaded", severity="error")
            return False
        self._refresh_presets(preset)
        self._preview()
        return True

    def _refresh_presets(self, also: str | None = None) -> None:
        """The preset list again (a preset saved or loaded just now joins it); keeps the current one."""
        choices = preset_choices(self.home)
        for value in (also, self.preset):
            if value and value not in [v for _, v in choices]:
                choices.append((f"{Path(value).stem}  ({value})", value))
        self.presets = choices
        select = self.query_one("#f-preset", Select)
        with self.prevent(Select.Changed):
            select.set_options(choices)
            select.value = self.preset

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_show_command(self) -> None:
        self._update_command()
        command = self.query_one("#command", Static)
        self.query_one("#new-run", VerticalScroll).scroll_to_widget(command)
        try:
            line = self.command()
            self.app.copy_to_clipboard(line)
            self.notify(line, title="command (copied to the clipboard where the terminal allows)")
        except ValueError as err:
            self.notify(str(err), severity="error")

    def action_submit(self) -> None:
        if self.submitting:
            return
        if not self.validate():
            first = next(iter(self.errors))
            self.notify(self.errors[first], title="not submitted", severity="error")
            return
        self.submitting = True
        self.query_one("#submit", Button).disabled = True
        if self.grid():
            self._submit_sweep(self.sweep())
        else:
            self._submit(self.build(), self.after())

    @work(thread=True, exclusive=True, group="submit")
    def _submit(self, spec, after: str | None) -> None:
        from jobs.runs import Jobs

        jobs = Jobs(self.home)
        try:
            run = jobs.submit(spec, after=after)
        except CherryError as err:
            self.app.call_from_thread(self._submit_failed, str(err))
            return
        finally:
            jobs.close()
        self.app.call_from_thread(self._submitted_ok, run.id, run.waiting_for_parent)

    @work(thread=True, exclusive=True, group="submit")
    def _submit_sweep(self, sweep) -> None:
        """Every point checked as `cherry sweep` checks them, then one run per point in one experiment."""
        from jobs.runs import Jobs
        from jobs.sweep import submit_sweep

        jobs = Jobs(self.home)
        try:
            runs = submit_sweep(sweep, jobs)
        except CherryError as err:
            self.app.call_from_thread(self._submit_failed, str(err))
            return
        finally:
            jobs.close()
        message = f"experiment {sweep.experiment}: queued {len(runs)} runs (e in the runs list opens it)"
        self.app.call_from_thread(self.notify, message, title="sweep submitted")
        self.app.call_from_thread(self.dismiss, runs[0].id)

    def _submit_failed(self, message: str) -> None:
        self.submitting = False
        self.query_one("#submit", Button).disabled = False
        key = error_field(message, list(FORM_FIELDS + method_fields()) + ["model", "dataset"])
        if message.startswith("--after"):
            key = "after"
        self._set_errors({key or "form": message})
        self.notify(message, title="not submitted", severity="error")

    def _submitted_ok(self, run_id: str, waiting: bool) -> None:
        self.notify(f"{run_id} queued" + (" (waits for the run it follows)" if waiting else ""), title="submitted")
        self.dismiss(run_id)

    # ------------------------------------------------------------------ dataset preview

    def _preview(self) -> None:
        value = self._input("dataset").value.strip()
        algorithm = self.defaults.get("algorithm", "dpo")
        self._read_preview(value, algorithm)

    @work(thread=True, exclusive=True, group="preview")
    def _read_preview(self, value: str, algorithm: str) -> None:
        text = dataset_preview(value, algorithm)
        self.app.call_from_thread(self.query_one("#dataset-preview", Static).update, text)
