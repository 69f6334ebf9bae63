"""Shared fixtures: the bundled SmolLM2, tiny GGUFs written with gguf.GGUFWriter, an isolated config dir."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import gguf_factory  # noqa: E402


@pytest.fixture(scope="session")
def smollm2() -> str:
    from mixrun.cli import default_model

    return default_model()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_llama(tiny_dir: Path) -> Path:
    return gguf_factory.write_model(tiny_dir / "tiny-llama.gguf", "llama", n_vocab=16)


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own user config dir, so nobody's real profiles leak in or get written."""
    cfg = tmp_path / "config"
    monkeypatch.setenv("MIXRUN_CONFIG_DIR", str(cfg))
    return cfg
