"""Specs the planner tests share: a sparse Llama-3-70B-shaped Q4_K_M file (real header, data as a hole)."""

from __future__ import annotations

from pathlib import Path

import pytest

import gguf_factory
from mixrun.gguf_spec import read_spec
from mixrun.model_spec import ModelSpec


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
