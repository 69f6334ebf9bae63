"""One running engine shared by the Run screen's thread workers, and the telemetry it is sampled for.

Loading, answering and closing run in workers; the telemetry poller samples from its own. An engine is never
closed while it generates: :meth:`EngineSession.close` asks the answer to stop and waits for it (one token) first.
Nothing here imports textual, so the lifecycle is testable without an app.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mixrun.backends.base import Engine, EngineInfo, Sampling, Stats
from mixrun.chat.conversation import Conversation
from mixrun.errors import MixrunError
from mixrun.telemetry import Snapshot

if TYPE_CHECKING:
    from mixrun.planner.types import Candidate
    from mixrun.rig.profile import RigProfile
    from mixrun.run import Launcher, LaunchOptions


@dataclass(frozen=True)
class Sample:
    """A telemetry snapshot plus what the session itself knows: tokens so far including the answer in flight
    (a backend may count an answer only when it ends) and the measured decode rate, live while generating."""

    snapshot: Snapshot
    tokens_total: int
    decode_tok_s: float | None
    prefill_tok_s: float | None
    generating: bool

    @property
    def t(self) -> float:
        return self.snapshot.t


class EngineSession:
    """Owns at most one :class:`~mixrun.backends.base.Engine` and the conversation held with it.

    ``launcher`` is :func:`mixrun.run.launch` unless a caller passes another (same signature)."""

    CLOSE_WAIT_S = 60.0

    def __init__(self, launcher: Launcher | None = None) -> None:
        self._launcher = launcher
        self._engine: Engine | None = None
        self._busy = threading.Lock()  # held while the engine loads, generates or closes
        self._stop = threading.Event()
        self._live: Stats | None = None
        self._tokens_done = 0
        self.conv = Conversation()
        self.last: Stats | None = None

    @property
    def engine(self) -> Engine | None:
        return self._engine

    @property
    def generating(self) -> bool:
        return self._live is not None

    def start(self, model: str, candidate: Candidate, profile: RigProfile, options: LaunchOptions) -> EngineInfo:
        """Close any running engine, then launch one for ``candidate`` on ``profile`` (blocking: call from a worker).
        The launch is the chat command's: preflight, device mapping, start."""
        self.close()
        if self._launcher is None:
            from mixrun.run import launch as launcher
        else:
            launcher = self._launcher
        with self._busy:
            self._stop.clear()
            engine = launcher(model, candidate, profile, options)
            self._engine, self.conv, self._tokens_done, self.last = engine, Conversation(), 0, None
        return engine.info

    def answer(self, text: str, sampling: Sampling, on_piece: Callable[[str], None],
               notify: Callable[[str], None]) -> Stats:
        """Add ``text`` as the user's turn and stream the answer to ``on_piece`` (blocking: call from a worker).
        :meth:`stop_answer` ends it early; the partial answer stays in the conversation."""
        from mixrun.chat.conversation import fit_prompt

        engine = self._engine
        if engine is None:
            raise MixrunError("no engine is running: start one first")
        with self._busy:
            self._stop.clear()
            stats = Stats()
            pieces: list[str] = []
            self.conv.add("user", text)
            self._live = stats
            try:
                prompt = fit_prompt(engine, self.conv, sampling, notify)
                gen = engine.generate(prompt, sampling, stats)
                try:
                    for piece in gen:
                        pieces.append(piece)
                        on_piece(piece)
                        if self._stop.is_set():
                            stats.stop_reason = "stopped"
                            break
                finally:
                    close = getattr(gen, "close", None)
                    if close is not None:
                        close()
            finally:
                self._tokens_done += stats.completion_tokens
                self._live = None
                self.last = stats
                self.conv.add("assistant", "".join(pieces).strip())
        return stats

    def stop_answer(self) -> None:
        self._stop.set()

    def reset_conversation(self) -> None:
        self.conv = Conversation()

    def sample(self) -> Sample | None:
        """The engine's telemetry now, or None when no engine runs (or it is closing under us)."""
        engine, live = self._engine, self._live
        if engine is None:
            return None
        try:
            snap = engine.telemetry()
        except Exception:  # a backend closing or a device gone: this sample is n/a, the next may not be
            return None
        own = self._tokens_done + (live.completion_tokens if live is not None else 0)
        decode = live.decode_tok_s if live is not None and live.decode_tok_s else snap.decode_tok_s
        prefill = live.prefill_tok_s if live is not None and live.prefill_tok_s else snap.prefill_tok_s
        return Sample(snap, max(snap.tokens_total, own), decode, prefill, live is not None)

    def close(self) -> None:
        """Stop any answer, wait for it, close the engine. Safe to call twice and from any thread."""
        self._stop.set()
        if not self._busy.acquire(timeout=self.CLOSE_WAIT_S):
            return  # still loading after a minute: leave it to process exit rather than free it under llama.cpp
        try:
            engine, self._engine = self._engine, None
            if engine is not None:
                engine.close()
        finally:
            self._busy.release()
