"""Widgets that place the pure views of :mod:`mixrun.tui.views` and :mod:`mixrun.tui.meter` on screen.

Attributes down: each widget gets values through a ``show(...)`` method called on the UI thread and renders them;
none of them reads the planner, the profile files or an engine itself.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import DataTable, Label, Sparkline, Static

from mixrun.planner.types import Candidate, PlanReport
from mixrun.tui import meter
from mixrun.tui.session import Sample
from mixrun.tui.views import memory_bars


class CandidateTable(DataTable[Any]):
    """The planner's candidates, one row each: chosen mark, label, fits, predicted decode and prefill tok/s."""

    FIXED_COLUMNS_WIDTH = 1 + 4 + 8 + 8 + 2 * 5 + 2  # mark, fits, decode, prefill, cell padding, scrollbar

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=False, **kwargs)
        self._report: PlanReport | None = None
        self._label_width = 0

    def show(self, report: PlanReport, highlight: int | None) -> None:
        self._report = report
        self._fill(highlight)

    def _fill(self, highlight: int | None) -> None:
        report = self._report
        if report is None:
            return
        width = self.size.width or self.app.size.width
        self._label_width = max(16, width - self.FIXED_COLUMNS_WIDTH)
        self.clear(columns=True)
        self.add_column(" ", key="mark", width=1)
        self.add_column("candidate", key="label", width=self._label_width)
        self.add_column("fits", key="fits", width=4)
        self.add_column(Text("decode", justify="right"), key="decode", width=8)
        self.add_column(Text("prefill", justify="right"), key="prefill", width=8)
        for i, c in enumerate(report.candidates):
            style = "" if c.fits else "red"
            mark = Text("▶", style="bold green") if i == report.chosen else Text(" ")
            decode = f"{c.decode_tok_s:,.1f}" + ("*" if c.measured else "")
            self.add_row(mark, Text(c.label, style=style), Text("yes" if c.fits else "no", style=style or "green"),
                         Text(decode, justify="right"), Text(f"{c.prefill_tok_s:,.0f}", justify="right"), key=str(i))
        if highlight is not None and 0 <= highlight < len(report.candidates):
            self.move_cursor(row=highlight, animate=False)

    def on_resize(self) -> None:
        width = self.size.width or self.app.size.width
        if self._report is not None and max(16, width - self.FIXED_COLUMNS_WIDTH) != self._label_width:
            self._fill(self.cursor_row)


class MemoryBars(Widget):
    """A bar per device of one candidate (weights / KV / compute / overhead / free), as wide as the widget."""

    DEFAULT_CSS = "MemoryBars { height: auto; }"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cand: Candidate | None = None
        self._labels: dict[str, str] = {}

    def show(self, cand: Candidate | None, labels: dict[str, str] | None = None) -> None:
        self._cand, self._labels = cand, labels or {}
        self.refresh(layout=True)

    def render(self) -> Text:
        return memory_bars(self._cand, self.content_size.width or 60, self._labels)

    def get_content_height(self, container: Any, viewport: Any, width: int) -> int:
        return 1 + (len(self._cand.devices) if self._cand is not None else 0)


class TelemetryPanel(Vertical):
    """Live figures of the running engine: tok/s sparkline, predicted vs measured, devices, links, stages."""

    HISTORY = 60  # samples kept for the sparkline (30 s at the default 0.5 s poll)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._history: deque[float] = deque([0.0] * self.HISTORY, maxlen=self.HISTORY)
        self._prev: Sample | None = None
        self.last: Sample | None = None  # what the panel shows now (tests read it)
        self.last_rates = meter.Rates()

    def compose(self) -> ComposeResult:
        yield Label("tok/s", classes="section")
        yield Sparkline(list(self._history), id="tok-spark")
        yield Static(Text("no engine running", style="dim"), id="tel-speed")
        yield Label("devices", classes="section")
        yield Static(id="tel-devices")
        yield Label("links", classes="section")
        yield Static(id="tel-links")
        yield Label("stages", classes="section")
        yield Static(id="tel-stages")

    def reset(self) -> None:
        """A new engine: counters start again, so do the rates."""
        self._prev = None

    def show(self, cur: Sample | None, plan: Any) -> None:
        if cur is None:
            self.query_one("#tel-speed", Static).update(Text("no engine running", style="dim"))
            return
        r = meter.rates(self._prev, cur)
        self._prev, self.last, self.last_rates = cur, cur, r
        self._history.append(r.tok_s)
        self.query_one("#tok-spark", Sparkline).data = list(self._history)
        self.query_one("#tel-speed", Static).update(meter.speed_text(cur, r, plan))
        self.query_one("#tel-devices", Static).update(meter.devices_text(cur, plan))
        wide = self.content_size.width >= 48
        self.query_one("#tel-links", Static).update(meter.links_text(cur, r, totals=wide))
        self.query_one("#tel-stages", Static).update(meter.stages_text(cur, totals=wide))


def status_line(label: str, state: str, extra: str = "") -> Text:
    """The Run screen's one-line status: the plan running and the engine's state."""
    out = Text(no_wrap=True, overflow="ellipsis")
    out.append(label, style="bold")
    out.append(" · ", style="dim")
    out.append(state, style="bold green" if state.startswith("ready") else "bold yellow")
    if extra:
        out.append(f"  {extra}", style="dim")
    return out
