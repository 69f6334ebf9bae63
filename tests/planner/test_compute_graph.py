"""ggml's graph allocator as the planner replays it (planner/compute_graph.py), and what the plan tells llama.cpp so
that its buffers are the ones planned."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import gguf_factory
from mixrun.model.gguf import read_spec
from mixrun.planner import PlanRequest, plan
from mixrun.planner.compute_graph import Graph, _Allocator, allocate
from mixrun.planner.memory import compute_bytes
from mixrun.rig.profile import load_profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import llamacpp_memory  # noqa: E402


def test_best_fit_skips_the_open_end_and_merges_neighbours() -> None:
    al = _Allocator(32)
    a, b, c = al.alloc(64), al.alloc(32), al.alloc(64)
    assert (a, b, c) == (0, 64, 96)
    al.free(a, 64)
    al.free(c, 64)  # c was last: it merges back into the open end
    assert al.alloc(32) == 0  # the smallest hole that fits, not the end
    assert al.alloc(64) == 96  # the hole left (32 bytes) is too small: the end, where c was
    al.free(b, 32)
    al.free(0, 32)  # [0, 32) and [32, 96) merge into one hole of 96
    assert al.alloc(96) == 0
    assert al.max_size == 160
    assert _Allocator(32).alloc(1) == 0 and al.alloc(1) == 160  # sizes round up to the alignment


def test_in_place_ops_views_and_outputs() -> None:
    g = Graph()
    x = g.op(64)
    y = g.op(64, x, inplace=True)  # x's last consumer, same size: y takes x's memory
    g.op(64, y, inplace=False)
    assert allocate(g) == 128  # x and y share; z beside them

    g = Graph()
    x = g.op(64)
    y = g.op(64, x, inplace=True)  # x is read again later: no reuse
    g.op(64, x, y)
    assert allocate(g) == 192

    g = Graph()
    x = g.op(64)
    v = g.view(x)
    g.op(64)  # x is alive while its view has consumers to come
    g.op(64, v)
    assert allocate(g) == 192

    g = Graph()
    out = g.op(64, output=True)
    g.op(64, out)
    g.op(64)  # an output is never freed, so this cannot take its place
    assert allocate(g) == 192


def test_slices_and_inputs(tmp_path: Path) -> None:
    spec = read_spec(gguf_factory.write_model(tmp_path / "m.gguf", "llama", n_layers=4, n_embd=256, n_head=8,
                                              n_head_kv=4, n_ff=768, n_vocab=8000))
    whole = compute_bytes(spec, ctx=2048, ubatch=512, n_layers=4, last=True, flash_attn=True)
    first_half = compute_bytes(spec, ctx=2048, ubatch=512, n_layers=2, last=False, flash_attn=True)
    second_half = compute_bytes(spec, ctx=2048, ubatch=512, n_layers=2, last=True, flash_attn=True, start=2)
    assert first_half < second_half <= whole  # the logits (8000 floats a token) are the largest tensor
    assert compute_bytes(spec, ctx=2048, ubatch=512, n_layers=0, last=True, flash_attn=True) >= 8000 * 4 * 512
    assert compute_bytes(spec, ctx=2048, ubatch=512, n_layers=0, last=False, flash_attn=True) == 0
    # a middle stage receives the hidden state instead of token ids (and no unused embedding input)
    assert compute_bytes(spec, ctx=2048, ubatch=512, n_layers=2, last=False, flash_attn=True, start=1) < first_half


def test_llama_gets_the_buffers_planned(tmp_path: Path) -> None:
    """llama-cpp-python defaults to a full-size cache for sliding-window layers and a 512-token micro-batch; the
    plan sizes both as llama-server does, so it passes them to ``Llama()`` and the server command."""
    spec = read_spec(gguf_factory.write_moe_model(tmp_path / "oss.gguf", "gpt-oss"))
    rig = load_profile("cpu-only")
    rep = plan(rig, spec, PlanRequest(backend="llama.cpp", ctx=2048, ubatch=256))
    chosen = rep.candidates[0]
    assert chosen.llama_kwargs["swa_full"] is False
    assert chosen.llama_kwargs["n_ubatch"] == chosen.llama_kwargs["n_batch"] == 256
    assert " -ub 256 -b 2048" in chosen.commands["llama_server"]
    dense = read_spec(gguf_factory.write_model(tmp_path / "dense.gguf", "llama"))
    kwargs = plan(rig, dense, PlanRequest(backend="llama.cpp", ctx=2048)).candidates[0].llama_kwargs
    assert "swa_full" not in kwargs and "n_ubatch" not in kwargs


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"])
def test_dense_graphs_match_llamacpp(tmp_path: Path, arch: str) -> None:
    """Each dense architecture's graph (Q/K/V order, sliding-window masks, phi3's fused QKV and FFN) gives llama.cpp's
    own compute buffer, with and without flash attention, f16 and q8_0 caches (the latter's Hadamard rotations)."""
    swa = {"sliding_window": 64} if arch in ("gemma2", "gemma3") else {}
    path = gguf_factory.write_model(tmp_path / f"{arch}.gguf", arch, n_layers=7, n_embd=256, n_head=4, n_head_kv=2,
                                    head_dim=64, n_ff=768, n_vocab=640, merges=True, tied=arch.startswith("gemma"),
                                    name="tiny", **swa)
    spec = read_spec(path)
    for ctx, ub, fa, kv in ((1024, 256, False, "f16"), (2048, 512, True, "f16"), (2048, 128, True, "q8_0")):
        res = llamacpp_memory.llamacpp_buffers(str(path), ctx, n_batch=ub, n_ubatch=ub, flash_attn=fa, type_k=kv,
                                               type_v=kv, no_alloc=True, extra_buffers=False, swa_full=False,
                                               timeout=120)
        ours = compute_bytes(spec, ctx=ctx, ubatch=ub, n_layers=spec.n_layers, last=True, flash_attn=fa, kv_type=kv)
        assert abs(ours / res["compute"] - 1) <= 0.01, (ctx, ub, fa, kv, ours, res["compute"])
