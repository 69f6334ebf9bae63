"""The planner's compute buffer for MoE models against llama.cpp's own (issue 16: within 10%).

llama.cpp reserves its compute buffer without allocating weights (``no_alloc``), so the tiny test models and sparse
files of real shapes are both measured for real, in a child process each. The planner replays ggml's allocator over
the graph llama.cpp builds (planner/compute_graph.py), so it is held to 3% here, not the issue's 10%."""

from __future__ import annotations

import dataclasses
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
TOLERANCE = 0.03


def _measured(path: Path, ctx: int, ubatch: int, flash_attn: bool) -> int:
    res = llamacpp_memory.llamacpp_buffers(str(path), ctx, n_batch=ubatch, n_ubatch=ubatch, flash_attn=flash_attn,
                                           no_alloc=True, extra_buffers=False, swa_full=False, timeout=300)
    assert res["compute"] > 0
    return res["compute"]


@pytest.fixture(scope="module")
def sparse(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("moe-full")
    return {name: gguf_factory.write_moe_model(d / f"{name}.gguf", arch, sparse=True, **kw)
            for name, (arch, kw) in SHAPES.items()}


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_full_size_compute_buffer(sparse: dict[str, Path], name: str, flash_attn: bool) -> None:
    spec = read_spec(sparse[name])
    ours = compute_bytes(spec, ctx=4096, ubatch=512, n_layers=spec.n_layers, last=True, flash_attn=flash_attn)
    theirs = _measured(sparse[name], 4096, 512, flash_attn)
    assert abs(ours / theirs - 1) <= TOLERANCE, (ours, theirs)


@pytest.mark.parametrize("arch", sorted(gguf_factory.TINY_MOE))
def test_tiny_compute_buffer(tmp_path: Path, arch: str) -> None:
    """Each tiny MoE model, and the same with twice the experts used, wider experts: at two contexts and two
    micro-batches, with and without flash attention. At these sizes the allocator's fragmentation is a quarter of
    the buffer, so a sum of the largest live tensors would miss by that much."""
    moe = gguf_factory.TINY_MOE[arch]["moe"]
    for i, change in enumerate(({}, {"moe": dataclasses.replace(moe, n_expert_used=4, n_ff_exp=96)})):
        path = gguf_factory.write_moe_model(tmp_path / f"{arch}-{i}.gguf", arch, **change)
        spec = read_spec(path)
        for ctx, ubatch, fa in ((512, 128, False), (512, 512, True), (4096, 512, False), (4096, 128, True)):
            ours = compute_bytes(spec, ctx=ctx, ubatch=ubatch, n_layers=spec.n_layers, last=True, flash_attn=fa)
            theirs = _measured(path, ctx, ubatch, fa)
            assert abs(ours / theirs - 1) <= TOLERANCE, (change, ctx, ubatch, fa, ours, theirs)
