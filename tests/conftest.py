"""Shared fixtures: the bundled SmolLM2, tiny GGUFs written with gguf.GGUFWriter, sparse big-model specs (real
headers, data as a hole), an isolated config dir."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Per-machine findings (llama.cpp's CPU probe, measured kernel choices) are made once per test session, never read
# from or written to the user's own cache.
os.environ["MIXRUN_CACHE_DIR"] = tempfile.mkdtemp(prefix="mixrun-test-cache-")

import gguf_factory  # noqa: E402
from mixrun.model.gguf import read_spec  # noqa: E402
from mixrun.model.spec import ModelSpec  # noqa: E402


@pytest.fixture(scope="session")
def smollm2() -> str:
    from mixrun.bundled import default_model

    return default_model()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_llama(tiny_dir: Path) -> Path:
    return gguf_factory.write_model(tiny_dir / "tiny-llama.gguf", "llama", n_vocab=16)


@pytest.fixture(scope="session")
def llama70b(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    path = gguf_factory.write_model(tmp_path_factory.mktemp("70b") / "Llama-3-70B-Q4_K_M.gguf", "llama",
                                    qtype="Q4_K_M", sparse=True, **gguf_factory.LLAMA3_70B)
    return read_spec(path)


@pytest.fixture(scope="session")
def small_spec(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    """A 6-layer, ~1 GiB model: small enough for exhaustive searches over layouts."""
    path: Path = gguf_factory.write_model(tmp_path_factory.mktemp("small") / "small.gguf", "llama", n_layers=6,
                                          n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=32000,
                                          qtype="Q8_0", sparse=True, tied=False)
    return read_spec(path)


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own user config dir, so nobody's real profiles leak in or get written."""
    cfg = tmp_path / "config"
    monkeypatch.setenv("MIXRUN_CONFIG_DIR", str(cfg))
    return cfg
