"""The planner's compute buffer for full-size MoE shapes against llama.cpp's own (issue 16: within 10%).

llama.cpp reserves its compute buffer without allocating weights (``no_alloc``), so sparse files of real shapes
are measured for real. Tiny test models are not compared: their buffers are a few MiB of logits and masks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import gguf_factory
from mixrun.model.gguf import read_spec
from mixrun.planner.memory import compute_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import llamacpp_memory  # noqa: E402

SHAPES = {"qwen3-30b-a3b": ("qwen3moe", dict(qtype="Q4_K_M", **gguf_factory.QWEN3_30B_A3B)),
          "gpt-oss-120b": ("gpt-oss", dict(gguf_factory.GPT_OSS_120B))}


@pytest.fixture(scope="module")
def sparse(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("moe-full")
    return {name: gguf_factory.write_moe_model(d / f"{name}.gguf", arch, sparse=True, **kw)
            for name, (arch, kw) in SHAPES.items()}


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_compute_buffer_within_ten_percent(sparse: dict[str, Path], name: str, flash_attn: bool) -> None:
    spec = read_spec(sparse[name])
    res = llamacpp_memory.llamacpp_buffers(str(sparse[name]), 4096, n_batch=512, n_ubatch=512, flash_attn=flash_attn,
                                           no_alloc=True, extra_buffers=False, swa_full=False, timeout=300)
    ours = compute_bytes(spec, ctx=4096, ubatch=512, n_layers=spec.n_layers, last=True, flash_attn=flash_attn)
    assert res["compute"] > 0
    assert abs(ours / res["compute"] - 1) <= 0.10, (ours, res["compute"])
