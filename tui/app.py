"""The mixrun Textual app: three modes (Plan, Run, Profiles) over one shared
:class:`~mixrun.tui.state.PlanState`.

:func:`make_app` builds it for ``mixrun tui`` and for the tests alike. It reads the model and the profile and
plans once before the app starts, so a bad path or context fails as a one-line CLI error and the first screen
paints a plan at once; every later re-plan runs in a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any, ClassVar

from textual.app import App
from textual.binding import Binding, BindingType

from mixrun.backends.base import Sampling
from mixrun.planner.types import Candidate, PlanRequest
from mixrun.rig.profile import RigProfile
from mixrun.tui.plan_screen import PlanScreen
from mixrun.tui.profiles_screen import ProfilesScreen
from mixrun.tui.run_screen import RunScreen
from mixrun.tui.session import EngineSession
from mixrun.tui.state import DETECTED, PlanState


class MixrunApp(App[int]):
    """Plan a rig, run the plan, browse profiles. Screens are modes, so each keeps its state when left."""

    CSS_PATH = "mixrun.tcss"
    TITLE = "mixrun"
    ENABLE_COMMAND_PALETTE = False
    MODES: ClassVar[dict[str, Any]] = {"plan": PlanScreen, "run": RunScreen, "profiles": ProfilesScreen}
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [(0, "-narrow"), (120, "-wide")]
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f1", "switch_mode('plan')", "Plan", key_display="F1"),
        Binding("f2", "switch_mode('run')", "Run", key_display="F2"),
        Binding("f3", "switch_mode('profiles')", "Profiles", key_display="F3"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, state: PlanState, *, simulate: bool = False, sampling: Sampling | None = None,
                 poll_s: float = 0.5, session: EngineSession | None = None, notes: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.state = state
        self.simulate = simulate
        self.sampling = sampling or Sampling()
        self.poll_s = poll_s  # seconds between telemetry samples
        self.session = session or EngineSession()
        self.notes = notes  # what detecting this machine could not find
        self.pending_run: Candidate | None = None  # set by the Plan screen, started by the Run screen
        self.pending_profile: str | None = None  # set by the Profiles screen, planned by the Plan screen

    def on_mount(self) -> None:
        self.switch_mode("plan")
        if self.notes:
            self.notify("this machine, detected without measuring: " + "; ".join(self.notes), timeout=10)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Hide the key of the screen already shown: the footer has no room to spare at 80 columns."""
        return not (action == "switch_mode" and parameters and parameters[0] == self.current_mode)

    def request_run(self, cand: Candidate) -> None:
        """Switch to the Run screen and start ``cand`` there."""
        self.pending_run = cand
        self.switch_mode("run")

    def use_profile(self, ref: str) -> None:
        """Plan with another profile (from the Profiles screen)."""
        self.pending_profile = ref
        self.switch_mode("plan")

    async def action_quit(self) -> None:
        await asyncio.to_thread(self.session.close)
        self.exit(0)

    async def on_unmount(self) -> None:
        await asyncio.to_thread(self.session.close)


def make_app(model: str | None = None, profile: str | RigProfile | None = None, ctx: int = 4096, *,
             request: PlanRequest | None = None, simulate: bool = False, sampling: Sampling | None = None,
             poll_s: float = 0.5, session: EngineSession | None = None) -> MixrunApp:
    """The app for ``mixrun tui`` and the tests. ``profile`` is a name, a path, a RigProfile, or None for this
    machine (detected without measuring). Raises :class:`~mixrun.errors.MixrunError` for a bad model, profile
    or request, before any screen exists."""
    from mixrun.model.gguf import read_spec
    from mixrun.planner import plan

    if model is None:
        from mixrun.bundled import default_model

        model = default_model()
    spec = read_spec(model)
    extra: dict[str, RigProfile] = {}
    notes: tuple[str, ...] = ()
    if profile is None:
        from mixrun.run import detect_here

        prof, found = detect_here(measure=False)
        ref, notes = DETECTED + prof.name, tuple(found)
        extra[ref] = prof
    elif isinstance(profile, RigProfile):
        prof, ref = profile, DETECTED + profile.name
        extra[ref] = prof
    else:
        from mixrun.rig.profile import load_profile

        prof, ref = load_profile(profile), profile
    req = request or PlanRequest(ctx=ctx)
    report = plan(prof, spec, req)
    state = PlanState(model_path=model, spec=spec, profile=prof, profile_ref=ref, request=req, report=report,
                      selected=report.chosen, extra_profiles=extra)
    return MixrunApp(state, simulate=simulate, sampling=sampling, poll_s=poll_s, session=session, notes=notes)


@contextlib.contextmanager
def _screen_fd_of_its_own() -> Iterator[None]:
    """Textual draws on ``sys.__stderr__`` (fd 2). llama-cpp-python with ``verbose=False`` points fds 1 and 2 at
    /dev/null while it loads a model, from whichever thread loads it, so frames drawn meanwhile were lost (a
    half-painted Run screen). Textual gets a duplicate of the terminal's fd that nobody redirects."""
    term = sys.__stderr__
    if term is None or not term.isatty():
        yield
        return
    own = os.fdopen(os.dup(term.fileno()), "w", encoding=term.encoding, errors=term.errors)
    sys.__stderr__ = own
    try:
        yield
    finally:
        sys.__stderr__ = term
        own.close()


def run(args: Any) -> int:
    """``mixrun tui``: build the app from the parsed arguments, run it, close the engine whatever happens."""
    req = PlanRequest(ctx=args.ctx, split=getattr(args, "split", None), backend=getattr(args, "backend", None))
    app = make_app(args.model, args.profile, args.ctx, request=req, simulate=getattr(args, "simulate", False))
    try:
        with _screen_fd_of_its_own():
            code = app.run()
    finally:
        app.session.close()
    return code or 0
