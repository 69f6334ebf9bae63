"""Pilot tests of the Run screen: start the chosen plan, stream an answer, stop it, stop the engine, show a
failure; and one real generation with the bundled SmolLM2 on llama.cpp."""

from __future__ import annotations

from typing import Any

from textual.widgets import Input, Markdown
from tui_helpers import FakeLauncher, asynctest, plain, record_telemetry, wait_for

from mixrun.backends.base import Sampling
from mixrun.errors import MixrunError
from mixrun.tui import make_app
from mixrun.tui.run_screen import RunScreen
from mixrun.tui.session import EngineSession
from mixrun.tui.widgets import TelemetryPanel


def _app(model: str, launcher: Any, profile: str = "dual-3090-nvlink-plus-3060", max_tokens: int = 12) -> Any:
    return make_app(model, profile, 4096, session=EngineSession(launcher=launcher), poll_s=0.05,
                    sampling=Sampling(temperature=0, max_tokens=max_tokens))


async def _start(pilot: Any, app: Any, load_s: float = 20.0) -> RunScreen:
    await pilot.press("r")
    await wait_for(pilot, lambda: isinstance(app.screen, RunScreen), "the Run screen")
    screen = app.screen
    await wait_for(pilot, lambda: screen.engine_state == "ready", "the engine to load", timeout=load_s)
    return screen


async def _ask(pilot: Any, screen: RunScreen, text: str) -> None:
    """Type ``text`` and submit it, as Enter does; ``pilot.press("enter")`` would also wait for the app to go
    idle, which it does only when the answer has finished streaming."""
    prompt = screen.query_one("#prompt", Input)
    prompt.value = text
    await prompt.action_submit()


@asynctest
async def test_run_starts_the_chosen_plan_streams_and_shows_telemetry(smollm2: str) -> None:
    launcher = FakeLauncher()
    app = _app(smollm2, launcher)
    async with app.run_test(size=(80, 24)) as pilot:
        chosen = app.state.report.best
        screen = await _start(pilot, app)
        model, cand, profile, opts = launcher.calls[0]
        assert cand is chosen and opts.n_ctx == 4096 and model == smollm2 and opts.simulate is False
        assert profile is app.state.profile and profile.name == "dual-3090-nvlink-plus-3060"
        assert "ready" in plain(screen.query_one("#run-status"))
        shown = record_telemetry(screen.query_one(TelemetryPanel))
        await _ask(pilot, screen, "What is 2+2?")
        await wait_for(pilot, lambda: screen.answers == 1, "the answer")
        answer = screen.query_one(".answer", Markdown)
        assert answer.source.startswith("The answer is **4**.")
        assert "What is 2+2?" in plain(screen.query_one(".user-msg"))
        panel = screen.query_one(TelemetryPanel)
        await wait_for(pilot, lambda: panel.last is not None and panel.last.tokens_total == 12, "12 tokens counted")
        assert "12 tokens" in plain(screen.query_one("#run-status"))
        links = plain(screen.query_one("#tel-links"))
        assert "gpu0↔gpu1 tp" in links and "gpu1↔gpu2 pipe" in links
        assert "ms/tok" in plain(screen.query_one("#tel-stages"))
        assert "100.0" in plain(screen.query_one("#tel-speed"))  # the predicted decode rate beside the measured
        assert max(peak for _, _, peak in shown) > 0  # the tok/s sparkline moved while it generated
        assert app.session.conv.turns[0] == {"role": "user", "content": "What is 2+2?"}


@asynctest
async def test_link_rates_move_while_an_answer_streams(smollm2: str) -> None:
    launcher = FakeLauncher(delay_s=0.03)
    app = _app(smollm2, launcher, max_tokens=40)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _start(pilot, app)
        shown = record_telemetry(screen.query_one(TelemetryPanel))
        await _ask(pilot, screen, "hi")
        await wait_for(pilot, lambda: screen.answers == 1, "the answer")
        live = [(s, r) for s, r, _ in shown if s.generating]
        assert live, "no telemetry sample while the answer streamed"
        assert any(r.link_bytes_s[("gpu0", "gpu1", "tp")] > 0 and r.link_bytes_s[("gpu1", "gpu2", "pipeline")] > 0
                   and r.tok_s > 0 for _, r in live)
        assert [s.tokens_total for s, _ in live] == sorted(s.tokens_total for s, _ in live)


@asynctest
async def test_escape_stops_the_answer_and_keeps_the_engine(smollm2: str) -> None:
    launcher = FakeLauncher(delay_s=0.02)
    app = _app(smollm2, launcher, max_tokens=500)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _start(pilot, app)
        await _ask(pilot, screen, "talk for a while")
        await wait_for(pilot, lambda: launcher.engines[0].tokens >= 3, "a few tokens")
        await pilot.press("escape")
        await wait_for(pilot, lambda: screen.answers == 1, "the stopped answer")
        assert app.session.last.stop_reason == "stopped" and app.session.last.completion_tokens < 500
        assert "(stopped)" in plain(screen.query_one("#run-status"))
        assert screen.engine_state == "ready" and not launcher.engines[0].closed


@asynctest
async def test_stopping_the_engine_closes_it_and_ctrl_r_starts_again(smollm2: str) -> None:
    launcher = FakeLauncher()
    app = _app(smollm2, launcher)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _start(pilot, app)
        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: screen.engine_state == "idle", "the engine to stop")
        assert launcher.engines[0].closed and app.session.engine is None
        assert "stopped" in plain(screen.query_one("#run-status"))
        await _ask(pilot, screen, "anyone there?")  # refused with a notification, not a crash
        await pilot.pause()
        assert screen.answers == 0 and len(screen.query(".user-msg")) == 0
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: screen.engine_state == "ready", "a second engine")
        assert len(launcher.engines) == 2 and app.session.engine is launcher.engines[1]


@asynctest
async def test_a_backend_that_fails_to_start_says_why(smollm2: str) -> None:
    def failing(model: str, candidate: Any, profile: Any, options: Any) -> Any:
        raise MixrunError(f"{candidate.backend}: unknown backend (known: llama.cpp)")

    app = _app(smollm2, failing)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("r")
        await wait_for(pilot, lambda: isinstance(app.screen, RunScreen), "the Run screen")
        screen = app.screen
        await wait_for(pilot, lambda: screen.engine_state == "failed", "the failure")
        notes = " ".join(plain(n) for n in screen.query(".note"))
        assert "could not start: llama.cpp: unknown backend (known: llama.cpp)" in notes
        assert "failed" in plain(screen.query_one("#run-status"))


@asynctest
async def test_quitting_closes_the_engine(smollm2: str) -> None:
    launcher = FakeLauncher(delay_s=0.02)
    app = _app(smollm2, launcher, max_tokens=10_000)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _start(pilot, app)
        await _ask(pilot, screen, "go on forever")
        await wait_for(pilot, lambda: launcher.engines[0].generating, "generation")
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: not app.is_running, "the app to exit", timeout=10)
    assert launcher.engines[0].closed and app.return_code == 0


@asynctest
async def test_real_generation_with_smollm2_on_llama_cpp(smollm2: str) -> None:
    """The bundled model, the real llama.cpp backend, greedy and short: the answer streams into the pane and
    the telemetry counts it."""
    app = make_app(smollm2, "cpu-only", 512, poll_s=0.1, sampling=Sampling(temperature=0, max_tokens=12))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _start(pilot, app)
        panel = screen.query_one(TelemetryPanel)
        await wait_for(pilot, lambda: panel.last is not None, "a first telemetry sample")
        assert panel.last.tokens_total == 0 and panel.last.decode_tok_s is None
        await _ask(pilot, screen, "What is the capital of France?")
        await wait_for(pilot, lambda: screen.answers == 1, "the answer", timeout=60)
        answer = screen.query_one(".answer", Markdown).source
        assert len(answer.split()) >= 3 and any(c.isalpha() for c in answer)
        assert app.session.last.completion_tokens == 12
        await wait_for(pilot, lambda: panel.last.tokens_total == 12, "tokens counted")
        assert panel.last.decode_tok_s is not None and panel.last.decode_tok_s > 0
        assert panel.last.snapshot.predicted_decode_tok_s == app.state.report.best.decode_tok_s
        speed = plain(screen.query_one("#tel-speed"))
        assert "tokens 12" in speed and "n/a" not in speed.split("decode")[1].split("\n")[0]
    assert app.session.engine is None  # closed on exit


@asynctest
async def test_real_generation_on_the_torch_hybrid_simulated(smollm2: str) -> None:
    """The torch backend inside the app: the forced hybrid on CPU processes (--simulate) loads, streams a greedy
    answer, and the panel shows both stages' times and the bytes the TP and pipeline links carried."""
    from mixrun.planner import PlanRequest

    req = PlanRequest(ctx=256, split="hybrid", backend="torch")
    app = make_app(smollm2, "dual-3090-nvlink-plus-3060", 256, request=req, simulate=True, poll_s=0.1,
                   sampling=Sampling(temperature=0, max_tokens=8))
    assert app.state.report.best.split.value == "hybrid"
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _start(pilot, app, load_s=90)
        panel = screen.query_one(TelemetryPanel)
        await _ask(pilot, screen, "What is the capital of France?")
        await wait_for(pilot, lambda: screen.answers == 1, "the answer", timeout=90)
        assert "Paris" in screen.query_one(".answer", Markdown).source  # greedy: "The capital of France is Paris."
        last = app.session.last
        assert last.stop_reason == "eos" and 5 <= last.completion_tokens < 8
        await wait_for(pilot, lambda: panel.last is not None and len(panel.last.snapshot.stages) == 2
                       and all(lk.bytes_total > 0 for lk in panel.last.snapshot.links), "stage and link figures")
        kinds = {lk.kind for lk in panel.last.snapshot.links}
        assert "pipeline" in kinds and len(kinds) >= 2
        stages = plain(screen.query_one("#tel-stages"))
        assert "ms/tok" in stages and "gpu0+gpu1" in stages
    assert app.session.engine is None  # the ranks were stopped on exit


@asynctest
async def test_a_gpu_torch_plan_runs_on_the_profiles_cuda_devices(smollm2: str, monkeypatch: Any) -> None:
    """The TUI launches like the chat command: the engine gets the rig profile, so a torch plan on a GPU rig puts its
    ranks on CUDA devices (it used to get no profile and put every rank on the CPU). The process start is stubbed:
    no GPU needed."""
    import torch

    from mixrun.backends.torch import launch as torch_launch
    from mixrun.planner.types import PlanRequest

    started: list[list[str]] = []

    def no_processes(slots: Any, job: dict[str, Any], **kw: Any) -> Any:
        started.append([s.torch_device for s in slots])
        raise MixrunError("stubbed: no rank processes in this test")

    monkeypatch.setattr(torch_launch, "start_local", no_processes)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    app = make_app(smollm2, "dual-3090-nvlink-plus-3060", 4096, request=PlanRequest(backend="torch", split="hybrid"),
                   poll_s=0.05)
    async with app.run_test(size=(80, 24)) as pilot:
        cand = app.state.candidate
        planned = [d for g in cand.groups for d in g.devices]
        assert cand.backend == "torch" and sorted(planned) == ["gpu0", "gpu1", "gpu2"]
        await pilot.press("r")
        await wait_for(pilot, lambda: isinstance(app.screen, RunScreen), "the Run screen")
        await wait_for(pilot, lambda: app.screen.engine_state == "failed", "the stubbed start")
    assert started == [[f"cuda:{d.removeprefix('gpu')}" for d in planned]]  # the profile's GPU order is CUDA's
