"""The Cherry app: launch runs, watch live curves and samples, compare runs — in one terminal.

Never imports torch: it reads the run store (in a background thread that owns its own SQLite
connection) and talks to the queue through `jobs.runs.Jobs`. Runs keep going when it closes.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.worker import get_current_worker

from jobs.home import cherry_home
from tuiapp.data import Snapshot, StoreReader, Want
from tuiapp.text import safe_text

POLL_LIVE_S = 0.5  # while a run is queued or running
POLL_IDLE_S = 2.0


class CherryApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "Cherry"
    BINDINGS = [Binding("q", "quit", "quit"), Binding("question_mark", "help", "help", show=False, key_display="?")]

    def __init__(
        self,
        home: Path | str | None = None,
        *,
        poll_live: float = POLL_LIVE_S,
        poll_idle: float = POLL_IDLE_S,
        focus: str | None = None,
        now: Callable[[], float] | None = None,
        home_label: str | None = None,
    ) -> None:
        """`focus`: a run to highlight once it appears (`cherry demo` opens on its run).
        `now` and `home_label` fix the clock (ages, ETAs) and the shown home, for reproducible screens."""
        super().__init__()
        self.home = Path(home) if home is not None else cherry_home()
        self.home.mkdir(parents=True, exist_ok=True)
        self.poll_live = poll_live
        self.poll_idle = poll_idle
        self.now: Callable[[], float] = now or time.time
        self.home_label = home_label
        self.initial_focus = focus
        self.want = Want(focus=focus)
        self.snapshot: Snapshot | None = None
        self.reads = 0  # snapshots applied (tests wait on this)
        self.store_problem: str | None = None  # "Redis unreachable" while the shared store cannot be read
        self._wake = threading.Event()

    def notify(self, message: str, *, title: str = "", markup: bool = True, **kwargs) -> None:
        """Every toast as plain, escaped text: messages name runs, paths and errors from the store."""
        super().notify(safe_text(message), title=safe_text(title), markup=False, **kwargs)

    def get_default_screen(self) -> Screen:
        from tuiapp.screens.main import MainScreen

        return MainScreen()

    def on_mount(self) -> None:
        self.read_store()

    # ------------------------------------------------------------------ store reading

    @work(thread=True, exclusive=True, group="reader", name="store reader")
    def read_store(self) -> None:
        """Read a snapshot, hand it to the UI, sleep; every POLL_LIVE_S while runs are live."""
        worker = get_current_worker()
        reader: StoreReader | None = None
        try:
            while not worker.is_cancelled:
                self._wake.clear()
                try:
                    reader = reader or StoreReader(self.home)
                    snap = reader.read(
                        Want(
                            self.want.focus,
                            self.want.sample_step,
                            tuple(self.want.compare),
                            tuple(self.want.compare_samples),
                        )
                    )
                except Exception as err:  # a locked or damaged store, Redis away: say so, keep trying
                    try:
                        self.call_from_thread(self._store_failed, err)
                    except RuntimeError:  # the app is shutting down
                        break
                    self._wake.wait(self.poll_idle)
                    continue
                if worker.is_cancelled:
                    break
                try:
                    self.call_from_thread(self._apply_snapshot, snap)
                except RuntimeError:  # the app is shutting down
                    break
                self._wake.wait(self.poll_live if snap.live else self.poll_idle)
        finally:
            if reader is not None:
                reader.close()

    def _store_failed(self, err: Exception) -> None:
        """A read that failed: an unreachable Redis shows in the header (once as a toast); other errors toast."""
        from jobs.shared import redis_unreachable

        if not (redis_unreachable(err) or "cannot reach Redis" in str(err)):
            self.notify(f"reading the run store failed: {err}", severity="error")
            return
        if self.store_problem is None:
            self.notify(f"{err}; showing the last runs read, retrying", title="Redis unreachable", severity="error")
        self.store_problem = "Redis unreachable"
        self._show_problem()

    def _show_problem(self) -> None:
        for screen in self.screen_stack:
            render = getattr(screen, "render_topbar", None)
            if render is not None and screen.is_mounted:
                try:
                    render()
                except NoMatches:
                    pass

    def _apply_snapshot(self, snap: Snapshot) -> None:
        self.store_problem = None  # read again: Redis is back
        self.snapshot = snap
        self.reads += 1
        for screen in self.screen_stack:
            apply = getattr(screen, "apply_snapshot", None)
            # A screen not mounted yet takes app.snapshot in its own on_mount.
            if apply is not None and screen.is_mounted:
                try:
                    apply(snap)
                except NoMatches:  # mid-compose or mid-teardown: the next snapshot will do
                    pass

    def wake_reader(self) -> None:
        self._wake.set()

    def focus_run(self, run_id: str | None) -> None:
        if run_id != self.want.focus:
            self.want.focus = run_id
            self.want.sample_step = None
            self.wake_reader()

    # ------------------------------------------------------------------ run lifecycle

    @work(thread=True, group="jobs")
    def run_job_action(self, action: str, run_id: str) -> None:
        """cancel / resume / remove a run, as `cherry cancel|resume|rm` do; errors become toasts."""
        from engine.errors import CherryError
        from jobs.runs import Jobs

        jobs = Jobs(self.home)
        try:
            if action == "cancel":
                message = jobs.cancel(run_id)
            elif action == "resume":
                message = f"{jobs.resume(run_id).id}: queued to resume from its last checkpoint"
            elif action == "remove":
                message = f"removed {jobs.remove(run_id).id}"
            else:
                raise ValueError(action)
            self.call_from_thread(self.notify, message, title=action)
        except CherryError as err:
            self.call_from_thread(self.notify, str(err), title=f"{action} refused", severity="error")
        finally:
            jobs.close()
            self.wake_reader()

    # ------------------------------------------------------------------ actions and palette

    def action_new_run(self) -> None:
        from tuiapp.screens.new_run import NewRunScreen

        def done(run_id: str | None) -> None:
            if run_id:
                self.wake_reader()

        self.push_screen(NewRunScreen(self.home, self.snapshot.runs if self.snapshot else []), done)

    def action_help(self) -> None:
        self.notify(
            "n new run · enter open/close (on a group row: fold) · g fold experiment · e experiment view · "
            "/ filter (#tag, lr=1e-6) · f status filter · o sort · space select · v compare · "
            "c cancel · r resume · d delete · m metrics · s smoothing · y log-y · x step/time · "
            "[ ] sample steps · p preference pairs first · 1-5 tabs · L label · ctrl+p all commands · q quit.  "
            "In Rollouts (5): ←/→ steps · o sort · j steps where the mean reward moved most · w vs another step.  "
            "Labelling: a A better · b B better · t tie · s skip · D train DPO · R train a reward model.  "
            "In compare: 2 samples side by side · a/b pick runs A/B · [ ] A's step · { } B's step · f frontier · "
            "r rollouts side by side · L label A vs B.  "
            "In an experiment: m metric · c colour by · f frontier.  "
            "In the new-run form: a list (1e-6,2e-6) sweeps a field · ctrl+s submit · ctrl+o command · "
            "f2 save preset · f3 load preset",
            title="keys",
            timeout=10,
        )

    def _main_action(self, name: str):
        def call() -> None:
            from tuiapp.screens.main import MainScreen

            screen = self.screen
            if not isinstance(screen, MainScreen):
                main = next((s for s in self.screen_stack if isinstance(s, MainScreen)), None)
                if main is None:
                    return
                while self.screen is not main:
                    self.pop_screen()
                screen = main
            getattr(screen, f"action_{name}")()

        return call

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if hasattr(screen, "action_samples"):  # compare
            yield SystemCommand(
                "Samples side by side",
                "Two of the compared runs on the same prompts, differences "
                "highlighted (2; a/b pick the runs, [ ] and { } their steps)",
                screen.action_samples,
            )
            yield SystemCommand("Frontier", "Reward vs KL at each eval point of each run (f)", screen.action_frontier)
            yield SystemCommand(
                "Rollouts side by side",
                "Runs A's and B's training rollouts on the same prompts, best first (r)",
                screen.action_rollouts,
            )
            yield SystemCommand(
                "Label A vs B",
                "Judge A's answer against B's on shared prompts, saved as preference pairs (L)",
                screen.action_label,
            )
        if hasattr(screen, "action_save_preset"):  # the new-run form
            yield SystemCommand(
                "Save preset", "Save the form's settings as a YAML preset of your own (f2)", screen.action_save_preset
            )
            yield SystemCommand(
                "Load preset", "Fill the form from a preset of your own or a YAML file (f3)", screen.action_load_preset
            )
        for title, help_text, action in (
            ("New run", "Pick model, dataset and preset, edit hyper-parameters, submit (n)", "new_run"),
            ("Cancel run", "Cancel the highlighted run (c)", "cancel_run"),
            ("Resume run", "Queue a failed / cancelled / interrupted run again from its checkpoint (r)", "resume_run"),
            ("Delete run", "Delete the highlighted run and its directory, after asking (d)", "delete_run"),
            ("Filter runs", "Filter the runs list by text (/)", "filter"),
            ("Filter by status", "Cycle the status filter: live, queued, running, completed, ... (f)", "status_filter"),
            ("Sort runs", "Cycle the runs' order: created, status, algorithm, key metric (o)", "sort"),
            ("Select run", "Add / remove the highlighted run to the comparison (space)", "toggle_select"),
            ("Compare runs", "Overlay the selected runs' curves; frontier view (v)", "compare"),
            (
                "Experiment view",
                "The highlighted experiment: curves coloured by a swept value, results table, frontier (e)",
                "experiment",
            ),
            ("Fold experiment", "Fold or unfold the highlighted experiment's runs under its group row (g)", "fold"),
            ("Pick metrics", "Choose the charts of the run view (m)", "pick_metrics"),
            ("Smoothing", "Cycle the EMA smoothing of the curves (s)", "smoothing"),
            ("Log-Y", "Toggle a logarithmic y axis (y)", "log_y"),
            ("X axis: step / time", "Plot against the step or wall time (x)", "x_axis"),
            ("Show curves", "The run view's charts (1)", "tab('tab-curves')"),
            (
                "Show samples",
                "Reference vs policy at a logged step; chosen vs rejected with rewards (2)",
                "tab('tab-samples')",
            ),
            (
                "Preference pairs first",
                "Samples: chosen vs rejected above the reference vs policy rows, or below (p)",
                "pairs_first",
            ),
            (
                "Show rollouts",
                "An online run's training rollouts: each prompt's group side by side with rewards and advantages (5)",
                "tab('tab-rollouts')",
            ),
            (
                "Label preferences",
                "Judge two completions at a time (the shown rollouts or samples); labels train DPO or a reward model (L)",
                "label",
            ),
            ("Show log", "The run's log tail (3 / l)", "tab('tab-log')"),
            ("Show spec and events", "The run's full spec and its events (4)", "tab('tab-spec')"),
        ):
            if "(" in action:
                name, arg = action.rstrip(")").split("(")
                yield SystemCommand(title, help_text, self._tab_command(arg.strip("'")))
            else:
                yield SystemCommand(title, help_text, self._main_action(action))

    def _tab_command(self, tab: str):
        def call() -> None:
            from tuiapp.screens.main import MainScreen

            main = next((s for s in self.screen_stack if isinstance(s, MainScreen)), None)
            if main is not None:
                main.action_tab(tab)

        return call


def run_app(home: Path | str | None = None, focus: str | None = None) -> None:
    """Open the app on `home`; a store that cannot be read is a CherryError before the screen opens
    (inside the app, a store that breaks later shows the same message as a notification)."""
    from jobs.home import store_path
    from jobs.store import Store

    home = Path(home) if home is not None else cherry_home()
    Store(store_path(home)).close()
    CherryApp(home, focus=focus).run()


if __name__ == "__main__":
    run_app()
