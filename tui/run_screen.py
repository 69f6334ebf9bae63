"""The Run screen: start the chosen plan, chat with it in a streaming Markdown pane, watch live telemetry.

Loading, answering, stopping and telemetry sampling each run in a thread worker; they report back with messages
(messages up) and only the handlers here touch widgets.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Input, Markdown, Static
from textual.worker import get_current_worker

from mixrun.backends.base import EngineInfo, Stats
from mixrun.planner.types import Candidate
from mixrun.tui.session import EngineSession, Sample
from mixrun.tui.state import PlanState, shared
from mixrun.tui.widgets import TelemetryPanel, status_line

if TYPE_CHECKING:
    from textual.widgets.markdown import MarkdownStream



class EngineStarted(Message):
    def __init__(self, info: EngineInfo) -> None:
        super().__init__()
        self.info = info


class EngineFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class EngineStopped(Message):
    pass


class AnswerPiece(Message):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class AnswerDone(Message):
    def __init__(self, stats: Stats | None, error: str | None = None) -> None:
        super().__init__()
        self.stats, self.error = stats, error


class ChatNote(Message):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class TelemetryTick(Message):
    def __init__(self, sample: Sample | None) -> None:
        super().__init__()
        self.sample = sample


def _error_text(e: BaseException) -> str:
    from mixrun.errors import MixrunError

    return str(e) if isinstance(e, MixrunError) else f"{type(e).__name__}: {e}"


class RunScreen(Screen[None]):
    AUTO_FOCUS = "#prompt"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+r", "start", "Start"),
        Binding("escape", "stop_answer", "Stop answer"),
        Binding("ctrl+t", "stop_engine", "Stop engine"),
        Binding("ctrl+l", "clear", "Clear"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.cand: Candidate | None = None
        self.engine_state = "idle"  # idle | loading | ready | answering | stopping | failed
        self.answers = 0  # answers finished (tests wait on it)
        self.ticks = 0  # telemetry samples shown
        self._stream: MarkdownStream | None = None
        self._wake = threading.Event()  # set to end the telemetry poller at once

    @property
    def state(self) -> PlanState:
        return shared(self.app).state

    @property
    def session(self) -> EngineSession:
        return shared(self.app).session

    def compose(self) -> ComposeResult:
        yield Static(id="run-status")
        with Horizontal(id="run-body"):
            with Vertical(id="chat-pane"):
                yield VerticalScroll(id="chat")
                yield Input(placeholder="Ask something; Enter sends", id="prompt")
            yield TelemetryPanel(id="telemetry")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self._set_status("no engine", "ctrl+r starts the plan highlighted on the Plan screen")
        self._poll()

    def on_unmount(self) -> None:
        self._wake.set()

    def on_screen_resume(self) -> None:
        cand = shared(self.app).pending_run
        if cand is not None:
            shared(self.app).pending_run = None
            self.start(cand)

    def _set_status(self, state: str, extra: str = "") -> None:
        label = "no plan" if self.cand is None else f"{self.cand.label} ({self.cand.backend.value})"
        if shared(self.app).simulate:
            label += ", simulated"
        self.query_one("#run-status", Static).update(status_line(label, state, extra))

    async def _say(self, text: str, style: str = "dim") -> None:
        chat = self.query_one("#chat", VerticalScroll)
        await chat.mount(Static(Text(text, style=style), classes="note"))
        chat.scroll_end(animate=False)

    # ---- engine -------------------------------------------------------------------------------------------------

    def start(self, cand: Candidate) -> None:
        if self.engine_state in ("loading", "stopping"):
            self.notify("the engine is busy; try again in a moment", severity="warning")
            return
        self.cand = cand
        self.engine_state = "loading"
        self.query_one(TelemetryPanel).reset()
        self._set_status("loading…", f"context {self.state.request.ctx:,}")
        self._start_worker(cand, self.state.request.ctx)

    @work(thread=True, group="engine")
    def _start_worker(self, cand: Candidate, ctx: int) -> None:
        try:
            from mixrun.run import LaunchOptions

            opts = LaunchOptions(n_ctx=ctx, simulate=shared(self.app).simulate, show_progress=False)
            info = self.session.start(self.state.model_path, cand, self.state.profile, opts)
        except Exception as e:  # a backend's failure, whatever it is, is shown here and must not end the app
            self.post_message(EngineFailed(_error_text(e)))
            return
        self.post_message(EngineStarted(info))

    async def on_engine_started(self, msg: EngineStarted) -> None:
        self.engine_state = "ready"
        self._set_status("ready", f"context {msg.info.n_ctx:,}")
        await self._say(f"{msg.info.backend} loaded {self.state.model_name}, context {msg.info.n_ctx:,}")
        for note in msg.info.notes:
            await self._say(f"note: {note}")

    async def on_engine_failed(self, msg: EngineFailed) -> None:
        self.engine_state = "failed"
        self._set_status("failed", "see the chat pane")
        await self._say(f"could not start: {msg.error}", style="bold red")

    @work(thread=True, group="engine")
    def _stop_worker(self) -> None:
        self.session.close()
        self.post_message(EngineStopped())

    async def on_engine_stopped(self, _msg: EngineStopped) -> None:
        self.engine_state = "idle"
        self._set_status("stopped", "ctrl+r starts it again")
        await self._say("engine stopped")

    # ---- chat ---------------------------------------------------------------------------------------------------

    @on(Input.Submitted, "#prompt")
    async def _send(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if self.engine_state != "ready":
            why = {"answering": "an answer is streaming (Escape stops it)", "loading": "the engine is loading"}
            self.notify(why.get(self.engine_state, "no engine running: ctrl+r starts one"), severity="warning")
            return
        event.input.value = ""
        chat = self.query_one("#chat", VerticalScroll)
        await chat.mount(Static(Text(text), classes="user-msg"))
        answer = Markdown(classes="answer")
        await chat.mount(answer)
        chat.anchor()
        self._stream = Markdown.get_stream(answer)
        self.engine_state = "answering"
        self._set_status("answering…", "Escape stops it")
        self._answer_worker(text)

    @work(thread=True, group="answer")
    def _answer_worker(self, text: str) -> None:
        app: Any = self.app
        try:
            stats = self.session.answer(text, app.sampling, lambda piece: self.post_message(AnswerPiece(piece)),
                                        lambda note: self.post_message(ChatNote(note)))
        except Exception as e:
            self.post_message(AnswerDone(None, _error_text(e)))
            return
        self.post_message(AnswerDone(stats))

    async def on_answer_piece(self, msg: AnswerPiece) -> None:
        if self._stream is not None:
            await self._stream.write(msg.text)

    async def on_chat_note(self, msg: ChatNote) -> None:
        await self._say(msg.text)

    async def on_answer_done(self, msg: AnswerDone) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        if self.engine_state == "answering":
            self.engine_state = "ready" if self.session.engine is not None else "idle"
        self.answers += 1
        if msg.error is not None:
            await self._say(f"mixrun: {msg.error}", style="bold red")
            self._set_status(self.engine_state)
            return
        assert msg.stats is not None
        st = msg.stats
        stopped = " (stopped)" if st.stop_reason == "stopped" else ""
        self._set_status(self.engine_state, f"{st.completion_tokens} tokens at {st.decode_tok_s:.1f} tok/s{stopped}")

    # ---- telemetry ----------------------------------------------------------------------------------------------

    @work(thread=True, group="telemetry")
    def _poll(self) -> None:
        worker = get_current_worker()
        app: Any = self.app
        was_none = False
        while not worker.is_cancelled and not self._wake.is_set():
            sample = self.session.sample()  # never raises: a failed read is None ("n/a")
            if sample is not None or not was_none:
                self.post_message(TelemetryTick(sample))
            was_none = sample is None
            self._wake.wait(app.poll_s)

    def on_telemetry_tick(self, msg: TelemetryTick) -> None:
        self.query_one(TelemetryPanel).show(msg.sample, self.cand)
        self.ticks += 1

    # ---- actions ------------------------------------------------------------------------------------------------

    def action_start(self) -> None:
        cand = self.state.candidate
        if cand is None or not cand.fits:
            self.notify("no plan that fits is highlighted on the Plan screen (F1)", severity="warning")
            return
        self.start(cand)

    def action_stop_answer(self) -> None:
        if self.engine_state == "answering":
            self.session.stop_answer()

    def action_stop_engine(self) -> None:
        if self.session.engine is None and self.engine_state != "loading":
            self.notify("no engine running")
            return
        self.engine_state = "stopping"
        self._set_status("stopping…")
        self._stop_worker()

    async def action_clear(self) -> None:
        if self.engine_state == "answering":
            self.notify("an answer is streaming (Escape stops it)", severity="warning")
            return
        self.session.reset_conversation()
        await self.query_one("#chat", VerticalScroll).remove_children()
