"""Fixtures for the TUI tests."""

from __future__ import annotations

import pytest
from tui_helpers import FakeLauncher


@pytest.fixture
def fake_launcher() -> FakeLauncher:
    return FakeLauncher()


@pytest.fixture(scope="session")
def llama70b_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A sparse Llama-3-70B-shaped Q4_K_M file (real header, data a hole): plans like the real one."""
    import gguf_factory

    path = gguf_factory.write_model(tmp_path_factory.mktemp("70b") / "Llama-3-70B-Q4_K_M.gguf", "llama",
                                    qtype="Q4_K_M", sparse=True, **gguf_factory.LLAMA3_70B)
    return str(path)
