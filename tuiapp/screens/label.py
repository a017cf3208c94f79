"""Labelling mode: two completions of one prompt side by side, the compare screen's highlighting on what
differs; a / b / t record A better, B better or a tie at once (tuiapp.labels), s skips; D or R queue a
DPO or reward-model run on the labels so far through the same submit path as the new-run form."""

from __future__ import annotations

from pathlib import Path

from rich.console import Group
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static

from jobs import CherryError
from tuiapp.data import RunInfo
from tuiapp.labels import TRAIN_METHODS, Candidate, LabelFile, frozen_copy, label_path, labels_spec
from tuiapp.screens.run_text import short_home
from tuiapp.widgets.chart import run_colour
from tuiapp.widgets.samples import pair_table, plain_prompt


def shown_path(app, path: Path, limit: int) -> str:
    """A file under the home as the screen names it (the app's fixed home label, when it has one)."""
    if app.home_label and path.is_relative_to(app.home):
        return f"{app.home_label}/{path.relative_to(app.home)}"
    return short_home(path, limit)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


class LabelScreen(Screen):
    BINDINGS = [
        Binding("a", "verdict('a')", "A better"),
        Binding("b", "verdict('b')", "B better"),
        Binding("t", "verdict('tie')", "tie"),
        Binding("s,space", "skip", "skip"),
        Binding("D", "train('dpo')", "train DPO"),
        Binding("R", "train('rm')", "train RM"),
        Binding("escape", "app.pop_screen", "back"),
    ]

    def __init__(self, candidates: list[Candidate], run: RunInfo, what: str, name: str | None = None) -> None:
        """`candidates` from `run` (the first run where they come from two), described by `what`; the labels
        go to HOME/labels/NAME.jsonl, NAME the run's name unless given."""
        super().__init__()
        self.candidates = candidates
        self.source_run = run
        self.what = what
        self.set_name = name or run.name
        self.labels: LabelFile | None = None  # read in a worker when the screen opens
        self.queue: list[Candidate] = []  # what is left to judge, in order
        self.skipped = 0
        self.before = 0  # candidates labelled in an earlier session
        self.submitting = False

    def compose(self) -> ComposeResult:
        yield Static(id="label-title")
        with VerticalScroll(id="label-scroll"):
            yield Static(id="label-body")
        yield Footer()

    @property
    def path(self) -> Path:
        return label_path(self.app.home, self.set_name)

    def on_mount(self) -> None:
        self._draw()
        self._open(self.path)

    @work(thread=True, exclusive=True, group="labels")
    def _open(self, path: Path) -> None:
        labels = LabelFile(path)  # repairs a line a crash cut short, counts what is there
        self.app.call_from_thread(self._opened, labels)

    def _opened(self, labels: LabelFile) -> None:
        self.labels = labels
        self.queue = [c for c in self.candidates if c.key not in labels.done]
        self.before = len(self.candidates) - len(self.queue)
        self._draw()

    # ------------------------------------------------------------------ actions

    def action_verdict(self, verdict: str) -> None:
        if self.labels is None or not self.queue:
            return
        try:
            self.labels.record(self.queue[0], verdict)  # on disk (fsynced) before the next pair shows
        except OSError as err:
            self.notify(f"the label was not saved: {err}", title=str(self.path), severity="error")
            return
        self.queue.pop(0)
        self._draw()

    def action_skip(self) -> None:
        if self.queue:
            self.queue.pop(0)
            self.skipped += 1
            self._draw()

    def action_train(self, method: str) -> None:
        if self.labels is None or self.submitting:
            return
        if not self.labels.pairs:
            self.notify("label a pair first (a or b): ties are not trained on", severity="warning")
            return
        model = self.source_run.spec.get("model")
        if not model:
            self.notify(f"{self.source_run.id} names no model to start from", severity="error")
            return
        self.submitting = True
        self._submit(method, str(model))

    @work(thread=True, exclusive=True, group="submit")
    def _submit(self, method: str, model: str) -> None:
        from jobs.runs import Jobs

        try:
            frozen = frozen_copy(self.path)
            spec = labels_spec(frozen, method, model, self.path.stem)
            jobs = Jobs(self.app.home)
            try:
                run = jobs.submit(spec)
            finally:
                jobs.close()
        except (CherryError, OSError, ValueError) as err:
            self.app.call_from_thread(self._submitted, None, str(err))
            return
        self.app.call_from_thread(self._submitted, run.id, f"{TRAIN_METHODS[method]} on {frozen.name}")

    def _submitted(self, run_id: str | None, message: str) -> None:
        self.submitting = False
        if run_id is None:
            self.notify(message, title="not submitted", severity="error")
            return
        self.notify(f"{run_id} queued: {message}", title="submitted")
        self.app.wake_reader()

    # ------------------------------------------------------------------ drawing

    def _draw(self) -> None:
        title = Text("Label ", style="bold")
        title.append(f"{self.what} of {self.source_run.name}", style="")
        shown = shown_path(self.app, self.path, max(20, (self.size.width or 80) - 40))
        counts = Text(f"→ {shown}: ", style="dim")
        body = self.query_one("#label-body", Static)
        if self.labels is None:
            counts.append("reading…", style="dim")
            self.query_one("#label-title", Static).update(Group(title, counts))
            body.update("")
            return
        counts.append(f"{plural(self.labels.pairs, 'pair')}, {plural(self.labels.ties, 'tie')} so far", style="bold")
        title.append(f"   {len(self.queue)} left of {len(self.candidates)}", style="dim")
        if self.before:
            title.append(f" ({self.before} labelled before)", style="dim")
        self.query_one("#label-title", Static).update(Group(title, counts))
        if not self.queue:
            message = "nothing left to label here" if self.candidates else "no two different completions to compare"
            body.update(
                Text(
                    f"{message}. D trains DPO, R a reward model on the {plural(self.labels.pairs, 'pair')} so far; "
                    "esc goes back.",
                    style="dim",
                )
            )
            return
        pair = self.queue[0]
        prompt = Text("prompt ", style="bold")
        prompt.append(plain_prompt(pair.prompt), style="italic")
        heads = []
        for letter, index, run, step, sample in (
            ("A", 0, pair.run_a, pair.step_a, pair.sample_a),
            ("B", 1, pair.run_b, pair.step_b, pair.sample_b),
        ):
            head = Text(f"{letter} ", style=f"bold {run_colour(index)}")
            where = f"{sample} · step {step}" if run == self.source_run.id else f"{run} · step {step} · {sample}"
            head.append(where, style="dim")
            heads.append(head)
        table = pair_table(pair.a, pair.b, run_colour(0), run_colour(1), *heads)
        body.update(Group(prompt, Text(""), table))

    def on_resize(self) -> None:
        self._draw()
