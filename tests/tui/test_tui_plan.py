"""Pilot tests of the Plan screen: it shows the plan, re-plans when the request changes, and says what would
fit when nothing does."""

from __future__ import annotations

from tui_helpers import asynctest, plain, wait_for

from mixrun.tui import make_app
from mixrun.tui.plan_screen import PlanScreen
from mixrun.tui.widgets import CandidateTable, MemoryBars


def _text(screen: PlanScreen, selector: str) -> str:
    return plain(screen.query_one(selector))


async def _replanned(pilot, screen: PlanScreen, before: int) -> None:  # type: ignore[no-untyped-def]
    await wait_for(pilot, lambda: screen.plans_shown > before, "a re-plan")


@asynctest
async def test_changing_the_context_replans_and_the_numbers_change(smollm2: str) -> None:
    app = make_app(smollm2, "cpu-only", 4096)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        assert isinstance(screen, PlanScreen)
        table = screen.query_one(CandidateTable)
        assert table.row_count == 2
        assert "llama.cpp, CPU only" in str(table.get_row_at(0)[1])
        bars = screen.query_one(MemoryBars).render().plain
        assert "280.4 MiB / 28.00 GiB" in bars
        before = screen.plans_shown
        await pilot.press("c", "ctrl+u", *"65536", "enter")
        await _replanned(pilot, screen, before)
        await wait_for(pilot, lambda: app.state.request.ctx == 65536, "ctx 65536 planned")
        assert app.state.report.request.ctx == 65536
        after = screen.query_one(MemoryBars).render().plain
        assert after != bars and "1.59 GiB / 28.00 GiB" in after  # KV grows 16x: 90 MiB -> 1.41 GiB
        assert app.state.report.best.devices[0].kv_bytes == 16 * 90 * 2**20


@asynctest
async def test_keys_change_split_backend_kv_and_context(smollm2: str) -> None:
    app = make_app(smollm2, "dual-3090-nvlink-plus-3060", 4096)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        kv_before = app.state.report.best.devices[-1].kv_bytes

        async def press(key: str) -> None:
            n = screen.plans_shown
            await pilot.press(key)
            await _replanned(pilot, screen, n)

        await press("plus")
        assert app.state.request.ctx == 8192
        await press("minus")
        await press("minus")
        assert app.state.request.ctx == 2048
        await press("k")
        assert app.state.request.kv_type == "q8_0"
        assert app.state.report.best.devices[-1].kv_bytes < kv_before
        await press("s")  # auto -> none
        assert app.state.request.split == "none"
        await press("s")  # none -> layer
        assert app.state.report.best.split.value == "layer"
        await press("b")
        assert app.state.request.backend == "llama.cpp"
        from textual.widgets import Select

        assert screen.query_one("#kv", Select).value == "q8_0"  # the controls follow the keys
        assert screen.query_one("#split", Select).value == "layer"


@asynctest
async def test_changes_made_while_a_plan_is_in_flight_add_up(smollm2: str) -> None:
    app = make_app(smollm2, "cpu-only", 4096)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        from textual.widgets import Select

        screen.query_one("#profile", Select).value = "dual-3090-nvlink"
        screen.action_scale_ctx(2)  # before the profile's plan came back
        screen.action_scale_ctx(2)
        await wait_for(pilot, lambda: app.state.request.ctx == 16384, "ctx 16384 planned")
        await wait_for(pilot, lambda: not list(app.workers), "plan workers to finish")
        await pilot.pause()
        assert app.state.profile.name == "dual-3090-nvlink" and app.state.request.ctx == 16384
        assert app.state.report.profile == "dual-3090-nvlink"


@asynctest
async def test_highlighting_a_candidate_redraws_the_rig(smollm2: str) -> None:
    app = make_app(smollm2, "dual-3090-nvlink-plus-3060", 4096)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        assert "all layers" in _text(screen, "#rig")
        await pilot.press("down")  # llama.cpp layer, default split: three stages
        await wait_for(pilot, lambda: app.state.selected == 1, "row 1 highlighted")
        rig = _text(screen, "#rig")
        assert "stage 3" in rig and "hand-off" in rig
        assert "default split" in _text(screen, "#detail")
        assert app.state.candidate is app.state.report.candidates[1]


@asynctest
async def test_switching_the_profile_replans_on_that_rig(smollm2: str) -> None:
    app = make_app(smollm2, "cpu-only", 4096)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        n = screen.plans_shown
        from textual.widgets import Select

        screen.query_one("#profile", Select).value = "8x-h100-sxm"
        await _replanned(pilot, screen, n)
        assert app.state.profile.name == "8x-h100-sxm"
        assert "8x-h100-sxm" in _text(screen, "#plan-title")
        assert "gpu7" in _text(screen, "#rig")  # idle or linked: all eight devices are drawn
        n = screen.plans_shown
        await pilot.press("p")  # the next profile in the list
        await _replanned(pilot, screen, n)
        assert app.state.profile.name != "8x-h100-sxm"


@asynctest
async def test_nothing_fits_shows_shortfall_suggestions_and_applies_one(llama70b_path: str) -> None:
    app = make_app(llama70b_path, "dual-3090-nvlink", 131072)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        detail = _text(screen, "#detail")
        assert "Nothing fits dual-3090-nvlink at context 131,072" in detail
        assert "short by" in detail and "suggestion: a context of 22,528 tokens fits" in detail
        await pilot.press("r")  # refuses to run a plan that does not fit
        await pilot.pause()
        assert app.current_mode == "plan"
        n = screen.plans_shown
        await pilot.press("a")
        await _replanned(pilot, screen, n)
        assert app.state.request.ctx == 22528
        assert app.state.report.best is not None and app.state.report.best.fits
        assert "Nothing fits" not in _text(screen, "#detail")


@asynctest
async def test_plan_screen_fits_80x24(smollm2: str) -> None:
    app = make_app(smollm2, "dual-3090-nvlink-plus-3060", 4096)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        screen = app.screen
        for sel in ("#plan-title", "#request-bar", "#candidates", "#detail", "Footer"):
            region = screen.query_one(sel).region
            assert region.height > 0 and region.right <= 80 and region.bottom <= 24, sel
        table = screen.query_one(CandidateTable)
        assert table.region.height >= table.row_count + 1  # every candidate visible without scrolling
        assert screen.has_class("-narrow")
