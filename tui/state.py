"""What the TUI's screens share: the plan state (attributes down) and the part of the app the screens use.

Screens reach the app through :func:`shared`, typed by :class:`Shared`, so they need not import the app module
(which imports them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

from mixrun.model.spec import ModelSpec
from mixrun.planner.types import Candidate, PlanReport, PlanRequest
from mixrun.rig.profile import RigProfile

if TYPE_CHECKING:
    from textual.app import App

    from mixrun.backends.base import Sampling
    from mixrun.tui.session import EngineSession

DETECTED = "@"  # prefix of the ref of a profile that lives only in memory (detected, or passed as a value)


@dataclass
class PlanState:
    """What the Plan screen shows and the Run screen starts (attributes down, shared by every screen)."""

    model_path: str
    spec: ModelSpec
    profile: RigProfile
    profile_ref: str  # a name, a path, or DETECTED + name
    request: PlanRequest
    report: PlanReport | None = None
    selected: int | None = None  # the highlighted candidate; the Run screen starts this one
    extra_profiles: dict[str, RigProfile] = field(default_factory=dict)  # DETECTED refs -> profiles

    @property
    def candidate(self) -> Candidate | None:
        r, i = self.report, self.selected
        if r is None:
            return None
        if i is None or not 0 <= i < len(r.candidates):
            return r.best
        return r.candidates[i]

    @property
    def model_name(self) -> str:
        return Path(self.model_path).name

    def profile_for(self, ref: str) -> RigProfile:
        """A profile by ref (blocking on a file read for names and paths: call from a worker)."""
        if ref in self.extra_profiles:
            return self.extra_profiles[ref]
        from mixrun.rig.profile import load_profile

        return load_profile(ref)

    def profile_choices(self) -> list[tuple[str, str]]:
        """(label, ref) for the profile picker: user, bundled (unless shadowed), detected, and the current one."""
        from mixrun.rig.profile import bundled_profiles, user_profiles

        users = [(n, n) for n, _ in user_profiles()]
        taken = {n for n, _ in users}
        out = users + [(n, n) for n, _ in bundled_profiles() if n not in taken]
        out += [(f"{p.name} (not saved)", ref) for ref, p in self.extra_profiles.items()]
        if self.profile_ref not in {ref for _, ref in out}:
            out.append((self.profile.name, self.profile_ref))
        return out


class Shared(Protocol):
    """The app as the screens see it (:class:`mixrun.tui.app.MixrunApp` implements it)."""

    state: PlanState
    session: EngineSession
    simulate: bool
    sampling: Sampling
    poll_s: float
    pending_run: Candidate | None  # set by the Plan screen, started by the Run screen
    pending_profile: str | None  # set by the Profiles screen, planned by the Plan screen

    def request_run(self, cand: Candidate) -> None: ...

    def use_profile(self, ref: str) -> None: ...


def shared(app: App[int]) -> Shared:
    return cast("Shared", app)
