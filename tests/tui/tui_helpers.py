"""Helpers for the TUI tests: a fake engine (fast, deterministic, with link and stage counters like the torch
backend's), waiting on app state, and reading what widgets show."""

from __future__ import annotations

import asyncio
import functools
import io
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from rich.console import Console
from textual.pilot import Pilot

from mixrun.backends.base import EngineInfo, Sampling, Stats
from mixrun.backends.template import ChatTemplate
from mixrun.telemetry import DeviceSample, LinkSample, Snapshot, StageSample


def asynctest(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a fresh event loop (no pytest async plugin needed); fixtures pass through."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


def plain(renderable: Any, width: int = 120) -> str:
    """What a widget's content reads as, without styles."""
    content = getattr(renderable, "content", renderable)
    if isinstance(content, str):
        return content
    con = Console(width=width, record=True, file=io.StringIO())
    con.print(content)
    return con.export_text()


async def wait_for(pilot: Pilot[Any], cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Let the app run until ``cond()`` holds; on a timeout, say what the app was doing."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            screen = pilot.app.screen
            state = {k: getattr(screen, k) for k in ("engine_state", "answers", "ticks", "plans_shown", "loads")
                     if hasattr(screen, k)}
            raise AssertionError(f"timed out waiting for {what} (screen {type(screen).__name__} {state}, "
                                 f"workers {[(w.name, w.state.name) for w in pilot.app.workers]})")
        await pilot.pause(0.05)


def record_telemetry(panel: Any) -> list[tuple[Any, Any, float]]:
    """Every (sample, rates, sparkline peak) the panel shows from now on: a test cannot poll fast enough to
    catch what the panel showed while an answer streamed (``pilot.press`` may return only when it ended)."""
    seen: list[tuple[Any, Any, float]] = []
    show = panel.show

    def spy(cur: Any, plan: Any) -> None:
        show(cur, plan)
        if cur is not None:
            seen.append((panel.last, panel.last_rates, max(panel.query_one("#tok-spark").data or [0.0])))

    panel.show = spy
    return seen


class FakeEngine:
    """An Engine that answers with a fixed text, a word per token, and counts traffic on two links the way a
    tensor-parallel x pipeline backend does."""

    ANSWER = "The answer is **4**. Two plus two makes four."

    def __init__(self, *, plan: Any = None, n_ctx: int = 4096, delay_s: float = 0.01, **_: Any) -> None:
        self.info = EngineInfo(backend="fake", model="fake.gguf", n_ctx=n_ctx, notes=["fake engine"], plan=plan)
        self.template = ChatTemplate(None, "fake.gguf")
        self.delay_s = delay_s
        self.tokens = 0
        self.closed = False
        self.generating = False

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, prompt: str, sampling: Sampling, stats: Stats) -> Iterator[str]:
        assert not self.closed, "generate on a closed engine"
        stats.prompt_tokens = self.count_tokens(prompt)
        t0 = time.perf_counter()
        self.generating = True
        try:
            words = self.ANSWER.split(" ") * (1 + sampling.max_tokens // 10)
            for i, w in enumerate(words[:sampling.max_tokens]):
                time.sleep(self.delay_s)
                now = time.perf_counter()
                if i == 0:
                    stats.prefill_s = now - t0
                else:
                    stats.decode_s = now - t0 - stats.prefill_s
                stats.completion_tokens += 1
                self.tokens += 1
                yield (" " if i else "") + w
            stats.stop_reason = "length"
        finally:
            self.generating = False

    def telemetry(self) -> Snapshot:
        return Snapshot(t=time.monotonic(), backend="fake", tokens_total=self.tokens,
                        predicted_decode_tok_s=100.0, predicted_prefill_tok_s=1000.0,
                        devices=(DeviceSample("gpu0", "cuda", 1 << 30, 24 << 30, 50.0),),
                        links=(LinkSample(("gpu0", "gpu1"), "tp", self.tokens * 4096),
                               LinkSample(("gpu1", "gpu2"), "pipeline", self.tokens * 1024)),
                        stages=(StageSample(("gpu0", "gpu1"), (0, 20), 0.004, self.tokens * 0.004),))

    def close(self) -> None:
        assert not self.generating, "closed while generating"
        self.closed = True


class FakeLauncher:
    """Stands in for :func:`mixrun.run.launch`; remembers the engines and arguments it was given."""

    def __init__(self, delay_s: float = 0.01) -> None:
        self.engines: list[FakeEngine] = []
        self.calls: list[tuple[str, Any, Any, Any]] = []  # (model, candidate, profile, options)
        self.delay_s = delay_s

    def __call__(self, model: str, candidate: Any, profile: Any, options: Any) -> FakeEngine:
        self.calls.append((model, candidate, profile, options))
        e = FakeEngine(plan=candidate, n_ctx=options.n_ctx, delay_s=self.delay_s)
        self.engines.append(e)
        return e
