"""make_app and ``mixrun tui``: errors before any screen, this machine as the default profile, light imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
from tui_helpers import asynctest, wait_for

from mixrun.cli import main
from mixrun.errors import GGUFError, MixrunError
from mixrun.tui import make_app
from mixrun.tui.plan_screen import PlanScreen
from mixrun.tui.profiles_screen import ProfilesScreen
from mixrun.tui.run_screen import RunScreen
from mixrun.tui.state import DETECTED


def test_a_bad_model_or_request_fails_before_the_app_starts(smollm2: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(GGUFError, match="no such file"):
        make_app(str(tmp_path / "missing.gguf"), "cpu-only")
    with pytest.raises(MixrunError, match="--ctx 8: must be between"):
        make_app(smollm2, "cpu-only", 8)
    with pytest.raises(MixrunError, match="no such profile"):
        make_app(smollm2, "no-such-rig")


def test_mixrun_tui_reports_errors_as_one_line(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["tui", str(tmp_path / "missing.gguf"), "--profile", "cpu-only"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixrun: ") and "missing.gguf" in err and "Traceback" not in err


def test_without_a_profile_the_app_plans_for_this_machine(smollm2: str) -> None:
    app = make_app(smollm2)
    assert app.state.profile_ref.startswith(DETECTED)
    assert any(d.backend == "cpu" for d in app.state.profile.devices)
    assert app.state.report is not None and app.state.report.profile == app.state.profile.name
    assert (app.state.profile.name + " (not saved)", app.state.profile_ref) in app.state.profile_choices()


@asynctest
async def test_function_keys_switch_screens_and_the_footer_hides_the_current_one(smollm2: str) -> None:
    app = make_app(smollm2, "cpu-only")
    async with app.run_test(size=(80, 24)) as pilot:
        assert isinstance(app.screen, PlanScreen)
        assert app.check_action("switch_mode", ("plan",)) is False
        assert app.check_action("switch_mode", ("run",)) is True
        seen = {}
        for key, cls in (("f2", RunScreen), ("f3", ProfilesScreen), ("f1", PlanScreen), ("f2", RunScreen)):
            await pilot.press(key)
            await wait_for(pilot, lambda cls=cls: isinstance(app.screen, cls), cls.__name__)
            seen.setdefault(cls, app.screen)
            assert app.screen is seen[cls]  # a mode keeps its screen (and its chat, its plan) when left
        assert app.check_action("switch_mode", ("run",)) is False
        assert app.session.engine is None  # visiting the Run screen starts nothing


def test_importing_mixrun_tui_and_the_cli_does_not_import_textual() -> None:
    code = ("import sys, mixrun.cli, mixrun.tui; "
            "assert 'textual' not in sys.modules, 'textual imported'; "
            "assert 'llama_cpp' not in sys.modules, 'llama_cpp imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
