"""Snapshots of the Plan screen: two bundled profiles with the bundled model, at 80x24 and 160x48.

Deterministic by construction: a bundled profile (nothing detected), no clock, no spinner, and the model reached
through a relative link so the commands shown do not carry this machine's install path.
Update with ``pytest tests/tui/test_tui_snapshots.py --snapshot-update`` after a deliberate change.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mixrun.tui import make_app


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
@pytest.mark.parametrize("profile", ["cpu-only", "dual-3090-nvlink-plus-3060"])
def test_plan_screen(snap_compare: Any, smollm2: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     profile: str, size: tuple[int, int]) -> None:
    name = Path(smollm2).name
    os.symlink(smollm2, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    app = make_app(name, profile, 4096)
    assert app.state.report.best is not None
    assert snap_compare(app, terminal_size=size)


def test_plan_screen_forced_hybrid(snap_compare: Any, smollm2: str, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``--split hybrid`` on the NVLink pair plus the odd card: two stages, the TP group, its NVLink."""
    from mixrun.planner import PlanRequest

    name = Path(smollm2).name
    os.symlink(smollm2, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    app = make_app(name, "dual-3090-nvlink-plus-3060", request=PlanRequest(ctx=4096, split="hybrid"))
    assert app.state.report.best.split.value == "hybrid"
    assert snap_compare(app, terminal_size=(80, 24))
