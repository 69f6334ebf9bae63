"""The Profiles screen: browse bundled and user profiles, validate them, detect this machine, compare two.

Reading profile files, detecting and planning for a comparison run in thread workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rich.console import Group as RichGroup
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, OptionList, Static
from textual.widgets.option_list import Option

from mixrun.errors import MixrunError
from mixrun.planner.types import PlanReport
from mixrun.rig.profile import RigProfile
from mixrun.tui.state import DETECTED, PlanState, shared
from mixrun.tui.views import compare_table, profile_detail, profile_summary


@dataclass(frozen=True)
class Entry:
    """One profile in the list: where it comes from, and either the profile or why it does not load."""

    name: str
    kind: str  # "user" | "bundled" | "bundled (shadowed)" | "detected"
    ref: str  # what PlanState.profile_for takes
    profile: RigProfile | None
    error: str | None = None


def load_entries(extra: dict[str, RigProfile]) -> list[Entry]:
    """Every user and bundled profile, each loaded (so validated), plus the in-memory ones. Reads files."""
    from importlib import resources

    from mixrun.errors import ProfileError
    from mixrun.rig.profile import bundled_profiles, load_profile_file, user_profiles

    out: list[Entry] = []
    users = list(user_profiles())
    for name, path in users:
        try:
            out.append(Entry(name, "user", name, load_profile_file(path)))
        except ProfileError as e:
            out.append(Entry(name, "user", name, None, str(e)))
    shadowed = {n for n, _ in users}
    for name, res in bundled_profiles():
        with resources.as_file(res) as p:
            try:
                prof = load_profile_file(p)
            except ProfileError as e:  # a bundled profile that fails is a bug, but show it rather than crash
                out.append(Entry(name, "bundled", name, None, str(e)))
                continue
            if name in shadowed:
                out.append(Entry(name, "bundled (shadowed)", str(p), prof))
            else:
                out.append(Entry(name, "bundled", name, prof))
    out += [Entry(p.name, "detected", ref, p) for ref, p in extra.items()]
    return out


class Loaded(Message):
    def __init__(self, entries: list[Entry], status: str, highlight: str | None = None) -> None:
        super().__init__()
        self.entries, self.status, self.highlight = entries, status, highlight


class Compared(Message):
    def __init__(self, a: Entry, b: Entry, ra: PlanReport | None, rb: PlanReport | None) -> None:
        super().__init__()
        self.a, self.b, self.ra, self.rb = a, b, ra, rb


class ProfilesScreen(Screen[None]):
    AUTO_FOCUS = "#profile-list"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("u", "use", "Use"),
        Binding("v", "validate", "Validate"),
        Binding("d", "detect", "Detect"),
        Binding("m", "mark", "Mark"),
        Binding("c", "compare", "Compare"),
        Binding("w", "save", "Save"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.entries: list[Entry] = []
        self.marked: str | None = None  # ref of the profile to compare the highlighted one with
        self.loads = 0  # lists loaded so far (tests wait on it)

    @property
    def state(self) -> PlanState:
        return shared(self.app).state

    def compose(self) -> ComposeResult:
        yield Static(id="profiles-title")
        with Horizontal(id="profiles-body"):
            yield OptionList(id="profile-list")
            with VerticalScroll(id="profile-detail-pane"):
                yield Static(id="profile-detail")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self._title("loading profiles…")
        self._load("")

    def _title(self, status: str) -> None:
        from mixrun.rig.profile import user_profile_dir

        out = Text.assemble(("Profiles", "bold"), (f"  user dir {user_profile_dir()}", "dim"))
        if status:
            out.append(f"\n{status}", style="yellow")
        self.query_one("#profiles-title", Static).update(out)

    @property
    def current(self) -> Entry | None:
        i = self.query_one(OptionList).highlighted
        return self.entries[i] if i is not None and 0 <= i < len(self.entries) else None

    # ---- loading and validating ----------------------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="profiles")
    def _load(self, status: str, validate: bool = False) -> None:
        entries = load_entries(dict(self.state.extra_profiles))
        if validate:
            bad = [e for e in entries if e.error]
            status = f"validated {len(entries)} profiles: {len(entries) - len(bad)} ok, {len(bad)} invalid" + (
                "".join(f"\n✗ {e.error}" for e in bad))
        self.post_message(Loaded(entries, status))

    def on_loaded(self, msg: Loaded) -> None:
        keep = msg.highlight or (self.current.ref if self.current else self.state.profile_ref)
        self.entries = msg.entries
        self._fill(keep)
        self._title(msg.status)
        self.loads += 1

    def _fill(self, highlight_ref: str | None) -> None:
        ol = self.query_one(OptionList)
        ol.clear_options()
        for e in self.entries:
            mark = Text("✓ ", style="green") if e.profile is not None else Text("✗ ", style="bold red")
            first = Text.assemble(mark, (e.name, "bold"), ("  ◆" if e.ref == self.marked else "", "magenta"),
                                  no_wrap=True, overflow="ellipsis")
            second = Text(f"  {e.kind} · {profile_summary(e.profile) if e.profile else 'invalid'}", style="dim",
                          no_wrap=True, overflow="ellipsis")
            ol.add_option(Option(RichGroup(first, second)))
        refs = [e.ref for e in self.entries]
        ol.highlighted = refs.index(highlight_ref) if highlight_ref in refs else (0 if refs else None)
        self._show_current()

    @on(OptionList.OptionHighlighted)
    def _highlighted(self) -> None:
        self._show_current()

    @on(OptionList.OptionSelected)
    def _selected(self) -> None:
        self.action_use()

    def _show_current(self) -> None:
        e = self.current
        detail = self.query_one("#profile-detail", Static)
        if e is None:
            detail.update("")
        elif e.profile is None:
            detail.update(Text(f"{e.name} ({e.kind}) does not load:\n{e.error}", style="bold red"))
        else:
            detail.update(profile_detail(e.profile, e.kind))

    # ---- actions -------------------------------------------------------------------------------------------------

    def action_use(self) -> None:
        e = self.current
        if e is None or e.profile is None:
            self.notify("this profile does not load; fix it first (v shows why)", severity="error")
            return
        shared(self.app).use_profile(e.ref)

    def action_validate(self) -> None:
        self._title("validating…")
        self._load("", validate=True)

    def action_detect(self) -> None:
        self._title("detecting this machine…")
        self._detect()

    @work(thread=True, exclusive=True, group="detect")
    def _detect(self) -> None:
        from mixrun.run import detect_here

        try:
            prof, notes = detect_here(measure=False)
        except MixrunError as e:
            self.post_message(Loaded(list(self.entries), f"detection failed: {e}"))
            return

        ref = DETECTED + prof.name
        self.state.extra_profiles[ref] = prof
        entries = load_entries(dict(self.state.extra_profiles))
        # the notes (what was not found) are in the profile's [extra] and show in its detail
        self.post_message(Loaded(entries, f"detected {prof.name}: {profile_summary(prof)} ({len(notes)} notes); "
                                 "w saves it as a user profile", ref))

    def action_mark(self) -> None:
        e = self.current
        if e is None:
            return
        self.marked = None if self.marked == e.ref else e.ref
        self._fill(e.ref)
        if self.marked:
            self._title(f"marked {e.name}: highlight another profile and press c to compare")

    def action_compare(self) -> None:
        a = next((e for e in self.entries if e.ref == self.marked), None)
        b = self.current
        if a is None or b is None or a.ref == b.ref:
            self.notify("mark a profile with m, highlight another, then press c", severity="warning")
            return
        if a.profile is None or b.profile is None:
            self.notify("both profiles must load to be compared", severity="error")
            return
        self._title(f"comparing {a.name} with {b.name}…")
        self._compare(a, b)

    @work(thread=True, exclusive=True, group="compare")
    def _compare(self, a: Entry, b: Entry) -> None:
        from mixrun.planner import plan

        def best(e: Entry) -> PlanReport | None:
            try:
                assert e.profile is not None
                return plan(e.profile, self.state.spec, self.state.request, suggest=False)
            except MixrunError:
                return None

        self.post_message(Compared(a, b, best(a), best(b)))

    def on_compared(self, msg: Compared) -> None:
        req = self.state.request
        head = Text.assemble((f"{msg.a.name}  vs  {msg.b.name}\n", "bold"),
                             (f"best plan of {self.state.model_name} at context {req.ctx:,}, KV {req.kv_type}",
                              "dim"))
        self.query_one("#profile-detail", Static).update(RichGroup(head, compare_table(
            msg.a.profile, msg.b.profile, msg.ra, msg.rb)))  # type: ignore[arg-type]
        self._title(f"compared {msg.a.name} with {msg.b.name}")

    def action_save(self) -> None:
        e = self.current
        if e is None or e.kind != "detected" or e.profile is None:
            self.notify("only a detected profile is saved from here (d detects this machine)", severity="warning")
            return
        self._save(e)

    @work(thread=True, exclusive=True, group="profiles")
    def _save(self, e: Entry) -> None:
        from mixrun.rig.profile import save_profile, user_profile_dir

        assert e.profile is not None
        try:
            path = save_profile(e.profile, user_profile_dir() / f"{e.profile.name}.toml")
        except (MixrunError, OSError) as err:
            self.post_message(Loaded(list(self.entries), f"could not save: {err}"))
            return
        self.post_message(Loaded(load_entries(dict(self.state.extra_profiles)), f"saved {path}"))
