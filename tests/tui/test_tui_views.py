"""The pure parts of the TUI: plan pictures, telemetry rates and texts, the engine session's lifecycle."""

from __future__ import annotations

import threading
import time

import pytest
from tui_helpers import FakeEngine, FakeLauncher, plain

from mixrun.backends.base import Sampling
from mixrun.model.gguf import read_spec
from mixrun.planner import PlanRequest, plan
from mixrun.rig.profile import load_profile
from mixrun.run import LaunchOptions
from mixrun.telemetry import LinkSample, Snapshot
from mixrun.tui import meter, views
from mixrun.tui.session import EngineSession, Sample


@pytest.fixture(scope="module")
def hybrid(llama70b_path: str):  # type: ignore[no-untyped-def]
    """The profile and its torch hybrid for the 70B (not the best plan: see tests/planner/test_plan.py)."""
    prof = load_profile("dual-3090-nvlink-plus-3060")
    report = plan(prof, read_spec(llama70b_path), PlanRequest(ctx=4096))
    return prof, next(c for c in report.candidates if c.split.value == "hybrid")


def test_rig_diagram_marks_stages_tp_group_and_links(hybrid) -> None:  # type: ignore[no-untyped-def]
    prof, cand = hybrid
    text = views.rig_diagram(prof, cand).plain
    (a, b), (c, d) = (g.layers for g in cand.groups)
    assert a == 0 and b == c and d == 80 and 0 < b < 4  # the 3060 takes the first few layers
    assert f"stage 1  layers 0-{b - 1} ({b})  gpu2" in text
    assert f"stage 2  layers {b}-79 ({80 - b})  gpu0 RTX 3090 24G ═ gpu1" in text  # NVLink drawn as a double line
    assert "TP 2, shares 50/50%, slowest nvlink 56.25 GB/s" in text
    assert "pcie 6.5 GB/s  gpu2→gpu0 hand-off" in text
    assert "idle: cpu" in text


def test_memory_bar_is_as_wide_as_asked_and_shows_each_part(hybrid) -> None:  # type: ignore[no-untyped-def]
    _, cand = hybrid
    for width in (8, 30, 77):
        for d in cand.devices:
            assert views.memory_bar(d, width).cell_len == width
    bars = views.memory_bars(cand, 80).plain.splitlines()
    gpu2 = next(d for d in cand.devices if d.id == "gpu2")
    assert bars[0].startswith("gpu2 ") and bars[0].endswith(f"{gpu2.total_bytes / 2**30:.2f} GiB / 10.80 GiB")
    assert "weights" in bars[-1] and "KV" in bars[-1] and "free" in bars[-1]


def test_detail_of_a_model_that_does_not_fit_says_by_how_much_and_what_would(llama70b_path: str) -> None:
    report = plan(load_profile("dual-3090-nvlink"), read_spec(llama70b_path), PlanRequest(ctx=131072))
    assert report.best is None
    text = views.candidate_detail(report, 0).plain
    assert "short by" in text
    assert "Nothing fits dual-3090-nvlink at context 131,072" in text
    assert "suggestion: a context of" in text
    over = [d for d in report.candidates[0].devices if not d.fits][0]
    assert "short by" in views.memory_bars(report.candidates[0], 80).plain
    assert views.memory_bar(over, 20).spans[0].style == "red"


def test_compare_table_names_both_profiles_and_their_best_plans(smollm2: str) -> None:
    a, b = load_profile("cpu-only"), load_profile("dual-3090-nvlink")
    spec = read_spec(smollm2)
    ra, rb = plan(a, spec), plan(b, spec)
    text = plain(views.compare_table(a, b, ra, rb), width=140)
    assert "cpu-only" in text and "dual-3090-nvlink" in text
    assert ra.best.label in text and rb.best.label in text
    assert "2x RTX 3090" in text and "nvlink 56.25" in text


def _sample(t: float, tokens: int, tp_bytes: int) -> Sample:
    snap = Snapshot(t=t, backend="fake", tokens_total=tokens,
                    links=(LinkSample(("gpu0", "gpu1"), "tp", tp_bytes),))
    return Sample(snap, tokens, None, None, False)


def test_rates_difference_cumulative_counters() -> None:
    assert meter.rates(None, _sample(1.0, 10, 100)).tok_s == 0.0
    r = meter.rates(_sample(1.0, 10, 1000), _sample(1.5, 30, 5000))
    assert r.tok_s == pytest.approx(40.0)
    assert r.link_bytes_s[("gpu0", "gpu1", "tp")] == pytest.approx(8000.0)
    restarted = meter.rates(_sample(2.0, 30, 5000), _sample(2.5, 2, 100))  # a new engine: counters start over
    assert restarted.tok_s == 0.0 and restarted.link_bytes_s[("gpu0", "gpu1", "tp")] == 0.0
    assert "gpu0↔gpu1 tp 7.8 KiB/s" in meter.links_text(_sample(1.5, 30, 5000), r).plain
    assert "total 4.9 KiB" in meter.links_text(_sample(1.5, 30, 5000), r, totals=True).plain


def test_session_streams_counts_live_and_stops_on_request() -> None:
    launcher = FakeLauncher(delay_s=0.02)
    s = EngineSession(launcher=launcher)
    s.start("m.gguf", None, None, LaunchOptions(n_ctx=512))
    pieces: list[str] = []
    seen_live: list[int] = []

    def on_piece(p: str) -> None:
        pieces.append(p)
        sample = s.sample()
        assert sample is not None and sample.generating
        seen_live.append(sample.tokens_total)
        if len(pieces) == 5:
            threading.Thread(target=s.stop_answer).start()

    stats = s.answer("hi", Sampling(max_tokens=100), on_piece, lambda m: None)
    assert stats.stop_reason == "stopped"
    assert 5 <= stats.completion_tokens < 100
    assert seen_live[:3] == [1, 2, 3]  # counted while generating, not only at the end
    assert s.conv.turns[-1] == {"role": "assistant", "content": "".join(pieces).strip()}
    s.close()
    assert launcher.engines[0].closed and s.engine is None and s.sample() is None


def test_session_close_waits_for_a_running_answer() -> None:
    launcher = FakeLauncher(delay_s=0.01)
    s = EngineSession(launcher=launcher)
    s.start("m.gguf", None, None, LaunchOptions(n_ctx=512))
    t = threading.Thread(target=s.answer, args=("hi", Sampling(max_tokens=10_000), lambda p: None, lambda m: None))
    t.start()
    while not launcher.engines[0].generating:
        time.sleep(0.005)
    s.close()  # FakeEngine.close asserts it is not generating
    t.join(5)
    assert launcher.engines[0].closed and not t.is_alive()
    assert isinstance(launcher.engines[0], FakeEngine)
