"""Pilot tests of the Profiles screen: browse, validate, detect this machine, save it, compare two, use one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual.widgets import OptionList
from tui_helpers import asynctest, plain, wait_for

from mixrun.rig.profile import bundled_profiles
from mixrun.tui import make_app
from mixrun.tui.plan_screen import PlanScreen
from mixrun.tui.profiles_screen import ProfilesScreen

BAD_PROFILE = """format = "mixrun-profile/1"
name = "broken"
[[devices]]
id = "gpu0"
backend = "cuda"
name = "RTX 3090"
vram_gib = -24.0
mem_bandwidth_gbs = 936.0
fp16_tflops = 71.0
"""


async def _open(pilot: Any, app: Any) -> ProfilesScreen:
    await pilot.press("f3")
    await wait_for(pilot, lambda: isinstance(app.screen, ProfilesScreen) and app.screen.loads >= 1, "profiles")
    return app.screen


def _highlight(screen: ProfilesScreen, name: str) -> None:
    screen.query_one(OptionList).highlighted = [e.name for e in screen.entries].index(name)


@asynctest
async def test_lists_bundled_and_user_profiles_and_validates_them(smollm2: str, _isolated_config: Path) -> None:
    (_isolated_config / "profiles").mkdir(parents=True)
    (_isolated_config / "profiles" / "broken.toml").write_text(BAD_PROFILE)
    app = make_app(smollm2, "cpu-only")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _open(pilot, app)
        names = [e.name for e in screen.entries]
        assert set(names) >= {n for n, _ in bundled_profiles()} and "broken" in names
        assert names[screen.query_one(OptionList).highlighted] == "cpu-only"  # the profile being planned
        assert "Host CPU" in plain(screen.query_one("#profile-detail"))
        _highlight(screen, "broken")
        await pilot.pause()
        assert "devices[0].vram_gib" in plain(screen.query_one("#profile-detail"))
        loads = screen.loads
        await pilot.press("v")
        await wait_for(pilot, lambda: screen.loads > loads, "validation")
        title = plain(screen.query_one("#profiles-title"))
        assert f"validated {len(names)} profiles: {len(names) - 1} ok, 1 invalid" in title
        await pilot.press("u")  # an invalid profile is not used
        await pilot.pause()
        assert app.current_mode == "profiles"


@asynctest
async def test_detect_adds_this_machine_and_save_writes_it(smollm2: str, _isolated_config: Path) -> None:
    app = make_app(smollm2, "cpu-only")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _open(pilot, app)
        loads = screen.loads
        await pilot.press("d")
        await wait_for(pilot, lambda: screen.loads > loads, "detection")
        current = screen.current
        assert current is not None and current.kind == "detected"
        assert any(d.backend == "cpu" for d in current.profile.devices)
        assert f"detected {current.name}" in plain(screen.query_one("#profiles-title"))
        loads = screen.loads
        await pilot.press("w")
        await wait_for(pilot, lambda: screen.loads > loads, "saving")
        saved = _isolated_config / "profiles" / f"{current.name}.toml"
        assert saved.is_file() and f'name = "{current.name}"' in saved.read_text()
        assert any(e.kind == "user" and e.name == current.name for e in screen.entries)


@asynctest
async def test_compare_two_profiles_plans_the_model_on_both(smollm2: str) -> None:
    app = make_app(smollm2, "cpu-only")
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await _open(pilot, app)
        await pilot.press("m")  # mark cpu-only
        assert screen.marked == "cpu-only"
        _highlight(screen, "dual-3090-nvlink")
        await pilot.pause()
        await pilot.press("c")
        await wait_for(pilot, lambda: "compared" in plain(screen.query_one("#profiles-title")), "the comparison")
        text = plain(screen.query_one("#profile-detail"), width=100)
        assert "cpu-only  vs  dual-3090-nvlink" in text
        assert "llama.cpp, CPU only" in text and "llama.cpp, one GPU (gpu0)" in text
        assert "2x RTX 3090" in text and "CPU only" in text


@asynctest
async def test_use_plans_with_the_highlighted_profile(smollm2: str) -> None:
    app = make_app(smollm2, "cpu-only")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _open(pilot, app)
        _highlight(screen, "4x-3090-pcie")
        await pilot.pause()
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, PlanScreen), "the Plan screen")
        await wait_for(pilot, lambda: app.state.profile.name == "4x-3090-pcie", "the re-plan")
        assert "4x-3090-pcie" in plain(app.screen.query_one("#plan-title"))
        assert "gpu3" in plain(app.screen.query_one("#rig"))
