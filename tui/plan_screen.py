"""The Plan screen: the rig as a diagram, memory per device, the planner's candidates; change the request and
re-plan at once (in a worker: the planner is pure and fast, but a model that does not fit searches for
suggestions)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Container, Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Label, Select, Static

from mixrun.errors import MixrunError
from mixrun.planner.types import PlanReport, PlanRequest
from mixrun.rig.profile import RigProfile
from mixrun.tui.experts import expert_placement, experts_text
from mixrun.tui.state import PlanState, shared
from mixrun.tui.views import candidate_detail, commands_text, memory_table, rig_diagram
from mixrun.tui.widgets import CandidateTable, MemoryBars
from mixrun.units import fmt_bytes, shortfalls
from mixrun.vocab import Backend, KVType, Split, choices, shown

SPLITS = tuple(choices(Split, auto=True))
BACKENDS = tuple(choices(Backend, auto=True))
KV_TYPES = tuple(choices(KVType))
MIN_CTX, MAX_CTX = 256, 1 << 24  # +/- stay inside what the planner accepts


class Planned(Message):
    """A plan worker finished; ``seq`` tells a stale result from the latest request."""

    def __init__(self, seq: int, ref: str, profile: RigProfile, report: PlanReport) -> None:
        super().__init__()
        self.seq, self.ref, self.profile, self.report = seq, ref, profile, report


class PlanFailed(Message):
    def __init__(self, seq: int, error: str) -> None:
        super().__init__()
        self.seq, self.error = seq, error


class PlanScreen(Screen[None]):
    AUTO_FOCUS = "#candidates"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("r", "run", "Run it"),
        Binding("c", "edit_ctx", "Ctx", show=False),
        Binding("plus,equals_sign", "scale_ctx(2)", "Ctx×2", key_display="+"),
        Binding("minus", "scale_ctx(0.5)", "Ctx÷2", key_display="-"),
        Binding("s", "cycle('split')", "Split"),
        Binding("b", "cycle('backend')", "Backend"),
        Binding("k", "cycle('kv')", "KV"),
        Binding("p", "cycle('profile')", "Rig"),
        Binding("a", "apply_suggestion", "Apply fix"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._seq = 0
        self.plans_shown = 0  # reports rendered so far (tests wait on it)
        self._profile_refs: list[str] = []
        self._want_ref: str | None = None  # the request being planned (None: the state's)
        self._want_req: PlanRequest | None = None

    @property
    def state(self) -> PlanState:
        return shared(self.app).state

    def compose(self) -> ComposeResult:
        req = self.state.request
        yield Static(id="plan-title")
        with Horizontal(id="request-bar"):
            yield Label("ctx")
            yield Input(str(req.ctx), type="integer", compact=True, id="ctx")
            yield Label("split")
            yield Select([(s, s) for s in SPLITS], value=shown(req.split), allow_blank=False, compact=True, id="split")
            yield Label("backend")
            yield Select([(b, b) for b in BACKENDS], value=shown(req.backend), allow_blank=False, compact=True,
                         id="backend")
            yield Label("KV")
            yield Select([(k, k) for k in KV_TYPES], value=req.kv_type.value, allow_blank=False, compact=True, id="kv")
            yield Label("rig")
            choices = self.state.profile_choices()
            self._profile_refs = [ref for _, ref in choices]
            yield Select(choices, value=self.state.profile_ref, allow_blank=False, compact=True, id="profile")
        with Container(id="plan-body"):
            with Vertical(id="plan-left"):
                yield CandidateTable(id="candidates")
                yield Static(id="detail")
                yield Static(id="commands")
            with Vertical(id="plan-right"):
                yield Static(id="rig")
                yield MemoryBars(id="memory")
                yield Static(id="memory-table")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        if self.state.report is not None:
            self._show_report()

    def on_screen_resume(self) -> None:
        """Back from the Profiles screen: it may have detected a machine or asked for another profile."""
        sel = self.query_one("#profile", Select)
        choices = self.state.profile_choices()
        if [ref for _, ref in choices] != self._profile_refs:
            self._profile_refs = [ref for _, ref in choices]
            with self.prevent(Select.Changed):
                sel.set_options(choices)
                sel.value = self.state.profile_ref
        wanted = shared(self.app).pending_profile
        if wanted is not None:
            shared(self.app).pending_profile = None
            if wanted != self.state.profile_ref:
                with self.prevent(Select.Changed):
                    sel.value = wanted
                self._replan(profile_ref=wanted)

    # ---- re-planning ----------------------------------------------------------------------------------------

    @property
    def _asked(self) -> PlanRequest:
        """The request last asked for (it may still be planning)."""
        return self._want_req or self.state.request

    def _replan(self, profile_ref: str | None = None, **changes: Any) -> None:
        """Plan the latest request: changes add up on what was last asked for, not on what was last planned, so
        a key pressed while a plan is in flight does not undo the change before it."""
        self._want_ref = profile_ref or self._want_ref or self.state.profile_ref
        self._want_req = dataclasses.replace(self._want_req or self.state.request, **changes)
        self._seq += 1
        self.query_one("#plan-title", Static).update(self._title(self._want_req, "planning…"))
        self._plan_worker(self._seq, self._want_ref, self._want_req)

    @work(thread=True, exclusive=True, group="plan")
    def _plan_worker(self, seq: int, ref: str, req: PlanRequest) -> None:
        from mixrun.planner import plan

        try:
            prof = self.state.profile if ref == self.state.profile_ref else self.state.profile_for(ref)
            report = plan(prof, self.state.spec, req)
        except MixrunError as e:
            self.post_message(PlanFailed(seq, str(e)))
            return
        self.post_message(Planned(seq, ref, prof, report))

    def on_planned(self, msg: Planned) -> None:
        if msg.seq != self._seq:
            return  # a newer request is being planned
        st = self.state
        st.profile, st.profile_ref, st.report, st.request = msg.profile, msg.ref, msg.report, msg.report.request
        st.selected = msg.report.chosen
        self._show_report()

    def on_plan_failed(self, msg: PlanFailed) -> None:
        if msg.seq != self._seq:
            return
        self._want_ref, self._want_req = None, None  # the next change starts from what was planned last
        self.query_one("#plan-title", Static).update(self._title(self.state.request, ""))
        self.query_one("#detail", Static).update(Text(f"mixrun: {msg.error}", style="bold red"))

    # ---- showing -----------------------------------------------------------------------------------------------

    def _title(self, req: PlanRequest, status: str) -> Text:
        st = self.state
        spec = st.spec
        out = Text()
        out.append(st.model_name, style="bold")
        out.append(f" ({fmt_bytes(spec.total_bytes)}) on ", style="dim")
        out.append(st.profile.name, style="bold")
        if shared(self.app).simulate:
            out.append(" · simulate", style="magenta")
        if req.cpu_offload:
            out.append(" · CPU offload", style="magenta")
        if status:
            out.append(f"  {status}", style="yellow")
        return out

    def _show_report(self) -> None:
        st = self.state
        report = st.report
        assert report is not None
        self.query_one("#plan-title", Static).update(self._title(st.request, ""))
        self.query_one(CandidateTable).show(report, st.selected)
        self._show_selected()
        self.refresh_bindings()
        self.plans_shown += 1

    def _show_selected(self) -> None:
        st = self.state
        assert st.report is not None
        cand = st.candidate
        self.query_one("#detail", Static).update(candidate_detail(st.report, st.selected))
        self.query_one("#commands", Static).update(commands_text(cand))
        labels: dict[str, str] = {}
        if st.spec.is_moe:  # where the routed experts are, and host RAM named as such in the bars
            hosts = frozenset(d.id for d in st.profile.devices if d.backend == "cpu")
            ram = any(p.in_ram for p in expert_placement(st.spec, cand, hosts))
            rig = rig_diagram(st.profile, cand, busy=hosts if ram else frozenset())
            experts = experts_text(st.spec, cand, hosts)
            if experts:
                rig.append("\n")
                rig.append_text(experts)
            labels = {h: f"{h} RAM" for h in hosts}
        else:
            rig = rig_diagram(st.profile, cand)
        self.query_one("#rig", Static).update(rig)
        self.query_one(MemoryBars).show(cand, labels)
        self.query_one("#memory-table", Static).update(memory_table(cand) if cand is not None else "")

    @on(DataTable.RowHighlighted, "#candidates")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        if self.state.report is None or event.cursor_row == self.state.selected:
            return
        self.state.selected = event.cursor_row
        self._show_selected()

    # ---- inputs -------------------------------------------------------------------------------------------------

    @on(Input.Changed, "#ctx")
    def _ctx_changed(self, event: Input.Changed) -> None:
        try:
            ctx = int(event.value)
        except ValueError:
            return
        if MIN_CTX <= ctx <= MAX_CTX and ctx != self._asked.ctx:
            self._replan(ctx=ctx)

    @on(Input.Submitted, "#ctx")
    def _ctx_submitted(self, event: Input.Submitted) -> None:
        try:
            ctx = int(event.value)
        except ValueError:
            ctx = -1
        if ctx != self._asked.ctx:
            self._replan(ctx=ctx)  # out-of-range values get the planner's own message
        self.query_one(CandidateTable).focus()

    @on(Select.Changed)
    def _select_changed(self, event: Select.Changed) -> None:
        value = event.value
        if value is Select.NULL:
            return
        match event.select.id:
            case "split" if value != shown(self._asked.split):
                self._replan(split=value)
            case "backend" if value != shown(self._asked.backend):
                self._replan(backend=value)
            case "kv" if value != self._asked.kv_type:
                self._replan(kv_type=value)
            case "profile" if value != (self._want_ref or self.state.profile_ref):
                self._replan(profile_ref=str(value))

    # ---- actions ------------------------------------------------------------------------------------------------

    def action_edit_ctx(self) -> None:
        self.query_one("#ctx", Input).focus()

    def action_scale_ctx(self, factor: float) -> None:
        box = self.query_one("#ctx", Input)
        try:  # the box, not the request: a second press may come before the first one's change is handled
            now = int(box.value)
        except ValueError:
            now = self._asked.ctx
        box.value = str(min(max(int(now * factor), MIN_CTX), MAX_CTX))

    def action_cycle(self, which: str) -> None:
        sel = self.query_one(f"#{which}", Select)
        values = {"split": SPLITS, "backend": BACKENDS, "kv": KV_TYPES, "profile": self._profile_refs}[which]
        if values:
            i = values.index(sel.value) if sel.value in values else -1
            sel.value = values[(i + 1) % len(values)]  # Select.Changed re-plans

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "apply_suggestion":  # shown only when the planner has suggestions
            return bool(self.state.report is not None and self.state.report.suggestions)
        return True

    def action_apply_suggestion(self) -> None:
        """Take the planner's first suggestion that is a request change (context, KV type, CPU offload)."""
        report = self.state.report
        for s in report.suggestions if report is not None else ():
            if "ctx" in s.change:
                self.query_one("#ctx", Input).value = str(s.change["ctx"])
            elif "kv_type" in s.change:
                self.query_one("#kv", Select).value = s.change["kv_type"]
            elif "cpu_offload" in s.change:
                self._replan(cpu_offload=True)
            else:
                continue
            self.notify(f"applied: {s.what}")
            return
        self.notify("no suggestion to apply: the chosen plan fits" if report is not None and report.best is not None
                    and report.best.fits else "no suggestion that changes the request")

    def action_run(self) -> None:
        cand = self.state.candidate
        if cand is None:
            self.notify("nothing to run: no candidate matches the request", severity="warning")
            return
        if not cand.fits:
            self.notify(f"{cand.label} does not fit ({shortfalls(cand.devices, ', ')}): pick one that fits, or change "
                        "the request", severity="error")
            return
        shared(self.app).request_run(cand)
