"""mixrun's torch backend: agreement with llama.cpp, parallel equivalence, communication, memory, failures.

Every multi-device layout runs as gloo CPU processes, one per planned device, exactly as ``--simulate`` does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import llama_cpp
import numpy as np
import psutil
import pytest
import torch
import torch.nn.functional as F
from llama_reference import reference

import gguf_factory
from mixrun.alloc import allocate
from mixrun.backends.base import Sampling
from mixrun.backends.torch import parallel, weights
from mixrun.backends.torch.cpu_matvec import cpu_chunks
from mixrun.backends.torch.engine import TorchEngine
from mixrun.backends.torch.linear import Norm, Weight
from mixrun.backends.torch.model import ModelConfig, RMSNorm, Rope, Transformer, pair_order
from mixrun.backends.torch.parallel import Comm, Layout, Stage, vocab_sizes
from mixrun.backends.torch.weights import materialize
from mixrun.errors import MixrunError, RuntimeFailure
from mixrun.model.gguf import TensorFile

GREEDY = Sampling(temperature=0.0, repeat_penalty=1.0, max_tokens=64)




def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _gone(pids: list[int], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="session")
def smollm2_f32(smollm2: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gguf_factory.dequantized_copy(smollm2, tmp_path_factory.mktemp("f32") / "SmolLM2-135M-F32.gguf")


# ---- pieces ----------------------------------------------------------------------------------------------------


def test_rope_pair_order_turns_neox_into_adjacent_pairs() -> None:
    """qwen GGUFs rotate ``(x[i], x[i + r/2])`` (NEOX). The loader puts their Q/K features in pair order, after
    which the one adjacent-pair rotation must equal the NEOX formula, permuted; partial RoPE keeps the tail. The
    order is convert_hf_to_gguf's own permutation for llama, whose GGUFs need none."""
    base = dict(n_layers=1, dim=64, n_head=2, n_head_kv=2, head_dim=32, ffn_dim=8, vocab=8, norm_eps=1e-5,
                rope_base=10000.0, qkv_bias=False, qk_norm=False, tied=True)
    assert pair_order(ModelConfig(arch="llama", rope_dim=32, rope_neox=False, **base)) is None
    assert pair_order(ModelConfig(arch="qwen2", rope_dim=32, rope_neox=True, **base)) == \
        torch.arange(32).view(2, 16).t().reshape(-1).tolist()
    cfg = ModelConfig(arch="qwen2", rope_dim=24, rope_neox=True, **base)
    rope = Rope(cfg, 16)
    rope.build(torch.device("cpu"))
    x = torch.randn(5, 2, 32)  # (T, heads, head_dim) in the NEOX layout, positions 7..11
    ang = torch.arange(7, 12, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, 24, 2) / 24)
    cos, sin = ang.cos().float()[:, None], ang.sin().float()[:, None]
    a, b = x[..., :12], x[..., 12:24]
    ref = torch.cat((a * cos - b * sin, a * sin + b * cos, x[..., 24:]), dim=-1)
    order = pair_order(cfg)
    steps = x[..., order]  # a copy: rotate_ works in place
    rope.rotate_(steps, 7)
    assert torch.allclose(steps, ref[..., order], atol=1e-5)
    one = x[2][:, order]  # a decode step: (heads, head_dim) at position 9
    rope.rotate_(one, 9)
    assert torch.allclose(one, ref[2][:, order], atol=1e-5)
    half = x[..., order].to(torch.bfloat16)  # through a float32 copy
    rope.rotate_(half, 7)
    assert torch.allclose(half.float(), ref[..., order], atol=3e-2)
    unordered = x.clone()
    rope.rotate_(unordered, 7)
    assert not torch.allclose(unordered, ref, atol=1e-3)


def test_decode_pieces_match_plain_torch() -> None:
    """The decode step's tuned pieces against plain torch: the row-block product (one row, several rows, bias),
    the five-operation RMS norm, and CPU parameters as views into one huge-page-advised map."""
    torch.manual_seed(0)
    w, b, x1, x3 = torch.randn(96, 40), torch.randn(96), torch.randn(1, 40), torch.randn(3, 40)
    blocked = Weight(w, b, chunks=2)
    assert blocked.blocks is not None and blocked.blocks.shape == (2, 48, 40)
    assert torch.allclose(blocked(x1), F.linear(x1, w, b), atol=1e-5)
    assert torch.allclose(blocked(x3), F.linear(x3, w, b), atol=1e-5)
    assert (cpu_chunks(96, 2), cpu_chunks(97, 2), cpu_chunks(96, 1)) == (2, 1, 1)
    norm = RMSNorm(40, 1e-5)
    norm.weight.data = torch.randn(40)
    ref = x3 / torch.sqrt(x3.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert torch.allclose(Norm(norm)(x3), ref, rtol=1e-5, atol=1e-6)
    with torch.device("meta"):
        net = torch.nn.Sequential(torch.nn.Linear(40, 96), torch.nn.Linear(96, 8))
    arena = materialize(net, torch.device("cpu"))
    assert arena is not None
    ptrs = [p.data_ptr() for p in net.parameters()]
    assert all(p.device.type == "cpu" for p in net.parameters())
    assert all(0 <= q - ptrs[0] < len(arena) for q in ptrs) and len(set(ptrs)) == len(ptrs)
    with torch.device("meta"):
        huge = torch.nn.Linear(1 << 29, 1 << 29, bias=False)  # 2^60 bytes: beyond any address space
    with pytest.raises(MixrunError, match=r"cannot allocate 1073741824.00 GiB for this rank's weights"):
        materialize(huge, torch.device("cpu"))


def test_layouts_from_plans_and_checks() -> None:
    cfg = ModelConfig("llama", 30, 576, 9, 3, 64, 1536, 49152, 1e-5, 1e4, 64, False, False, False, True)
    lay = Layout((Stage(("a", "b"), (0, 20), (2, 1)), Stage(("c",), (20, 30), (3,))))
    lay.check(cfg)
    assert lay.world == 3 and lay.driver == 2 and lay.locate(1) == (0, 1) and lay.ranks(1) == [2]
    assert Layout.from_json(lay.to_json()) == lay
    with pytest.raises(ValueError, match="contiguously"):
        Layout((Stage(("a",), (0, 10), (3,)), Stage(("b",), (11, 30), (3,)))).check(cfg)
    with pytest.raises(ValueError, match="KV heads"):
        Layout((Stage(("a", "b"), (0, 30), (3, 0)),)).check(cfg)


def test_tp_layout_from_a_plan_takes_its_kv_heads(smollm2: str) -> None:
    """The runtime takes a plan's KV heads as they are, and sizes FFN and vocabulary shards with the planner's own
    allocator (no float shares, no second allocator)."""
    from mixrun.model.gguf import read_spec
    from mixrun.planner import PlanRequest, plan
    from mixrun.planner.types import Group
    from mixrun.rig.profile import load_profile

    spec = read_spec(smollm2)
    c = plan(load_profile("dual-3090-nvlink-plus-3060"), spec, PlanRequest(backend="torch", split="hybrid")).best
    assert c is not None
    lay = Layout.from_groups(c.groups, spec.n_head_kv)
    assert [s.kv_heads for s in lay.stages] == [g.kv_heads or (spec.n_head_kv,) for g in c.groups]
    assert (2, 1) in [s.kv_heads for s in lay.stages]
    # 1 + 7 of 8 heads: re-deriving counts from the float shares (1/8, 7/8), at least one each, would give 2 + 6
    g = Group(("a", "b"), (0, 30), kv_heads=(1, 7))
    assert allocate(8, g.shares, minimum=1) == [2, 6]
    assert Layout.from_groups([g, Group(("c",), (30, 32))], 8).stages == (Stage(("a", "b"), (0, 30), (1, 7)),
                                                                          Stage(("c",), (30, 32), (8,)))
    with pytest.raises(ValueError, match="not one per member"):
        Layout.from_groups([Group(("a", "b"), (0, 30), (0.5, 0.5))], 8)  # a row split's group names no heads
    # one allocator: ties of equal remainders go to the lower index on both sides
    assert parallel.allocate is allocate
    cfg = ModelConfig("llama", 30, 576, 9, 3, 64, 1536, 2, 1e-5, 1e4, 64, False, False, False, True)
    assert vocab_sizes(cfg, Stage(("a", "b", "c"), (0, 30), (4, 1, 1))) == allocate(2, [4, 1, 1]) == [2, 0, 0]


def _in_process(path: str | Path, max_pos: int) -> Transformer:
    """A whole model in this process (TP=1), built as a rank builds its part."""
    tf = TensorFile(str(path))
    cfg = ModelConfig.from_gguf(tf.spec, tf.fields)
    stage = Stage(("cpu",), (0, cfg.n_layers), (cfg.n_head_kv,))
    model, _held = weights.build_part(tf, cfg, stage, 0, Comm(None, 1), head=True, max_pos=max_pos,
                                      dtype=torch.float32, device=torch.device("cpu"))
    return model


def _decode_side_by_side(path: str | Path, prompt: list[int], a: Transformer, b: Transformer, steps: int,
                         b_pos: Callable[[int], int | torch.Tensor] = int) -> None:
    """Greedy decoding with two in-process builds of one model: the same token and logits within 1e-5 (relative)
    at every step; ``b_pos`` gives the position as ``b`` takes it."""
    with torch.inference_mode():
        ids = torch.tensor(prompt)
        la = a.logits(a(a.embed_tokens(ids), 0)[-1:])
        lb = b.logits(b(b.embed_tokens(ids), 0)[-1:])
        for pos in range(len(prompt), len(prompt) + steps):
            tok = torch.argmax(la[-1]).view(1)
            assert torch.equal(tok, torch.argmax(lb[-1]).view(1))
            la = a.logits(a(a.embed_tokens(tok), pos))
            lb = b.logits(b(b.embed_tokens(tok), b_pos(pos)))
            assert _rel(lb.numpy(), la.numpy()) < 1e-5, (path, pos)


def test_fixed_shape_decode_steps_equal_the_usual_ones(smollm2: str, tmp_path: Path) -> None:
    """The decode step a CUDA graph captures (position as a tensor, attention over the whole cache, later
    positions masked) gives the usual step's logits, on llama (SmolLM2) and on qwen3 (QK norm, NEOX order)."""
    qwen3 = gguf_factory.write_model(tmp_path / "qwen3.gguf", "qwen3", n_layers=2, n_embd=128, n_head=4,
                                     n_head_kv=2, head_dim=48, n_ff=256, n_vocab=64, tied=False, seed=5)
    for path, prompt in ((smollm2, [504, 3575, 282, 4649, 314]), (qwen3, [1, 5, 9, 3])):
        usual, fixed = _in_process(path, 48), _in_process(path, 48)
        _decode_side_by_side(path, prompt, usual, fixed, 6, lambda pos: torch.tensor([pos]))


def test_buffered_cpu_decode_step_equals_the_eager_one(smollm2: str, tmp_path: Path) -> None:
    """The CPU decode step over preallocated buffers (``step.DecodeStep``) gives the eager step's logits: llama
    (SmolLM2, row blocks), qwen2 (QKV bias), qwen3 (QK norm, explicit head dim) and a llama with RoPE on half of
    each head."""
    qwen2 = gguf_factory.write_model(tmp_path / "qwen2.gguf", "qwen2", n_layers=2, n_embd=96, n_head=6,
                                     n_head_kv=2, n_ff=160, n_vocab=64, tied=False, seed=3)
    qwen3 = gguf_factory.write_model(tmp_path / "qwen3.gguf", "qwen3", n_layers=2, n_embd=128, n_head=4,
                                     n_head_kv=2, head_dim=48, n_ff=256, n_vocab=64, tied=False, seed=5)
    half = gguf_factory.write_model(tmp_path / "half.gguf", "llama", n_layers=2, n_embd=64, n_head=4, n_head_kv=2,
                                    n_vocab=64, extra_kv={"llama.rope.dimension_count": 8}, seed=7)
    for path, prompt in ((smollm2, [504, 3575, 282, 4649, 314]), (qwen2, [1, 2, 3]), (qwen3, [1, 5, 9, 3]),
                         (half, [4, 8, 15])):
        buffered, eager = _in_process(path, 48), _in_process(path, 48)
        assert buffered.step is not None
        eager.step = None
        _decode_side_by_side(path, prompt, buffered, eager, 8)


# ---- against llama.cpp -------------------------------------------------------------------------------------------


def test_f32_smollm2_matches_llamacpp(smollm2_f32: Path) -> None:
    vocab = llama_cpp.Llama(model_path=str(smollm2_f32), vocab_only=True, verbose=False)
    toks = vocab.tokenize(b"<|im_start|>user\nTell me about the Moon.<|im_end|>\n<|im_start|>assistant\n",
                          add_bos=False, special=True)
    vocab.close()
    ref_logits, ref_tokens = reference(smollm2_f32, toks, 64, 256)
    eng = TorchEngine(str(smollm2_f32), n_ctx=256)
    try:
        logits = eng.logits(toks)
        assert _rel(logits, ref_logits) < 2e-5  # measured 2.7e-6
        ours = list(eng.generate_ids(toks, GREEDY))
    finally:
        eng.close()
    assert len(ours) == 64 and ours == ref_tokens


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_random_qwen_matches_llamacpp(arch: str, tmp_path: Path) -> None:
    """Half-split RoPE, QKV bias (qwen2), QK norm and an explicit head dim (qwen3), random weights."""
    path = gguf_factory.write_model(tmp_path / f"{arch}.gguf", arch, n_layers=2, n_embd=128, n_head=4, n_head_kv=2,
                                    head_dim=48 if arch == "qwen3" else None, n_ff=256, n_vocab=64, tied=False,
                                    merges=True, seed=3)
    toks = [1, 5, 9, 3, 7, 2, 11, 4]
    ref_logits, ref_tokens = reference(path, toks, 32, 64)
    eng = TorchEngine(str(path), n_ctx=64)
    try:
        assert _rel(eng.logits(toks), ref_logits) < 1e-5  # measured 5e-7 (qwen2), 9e-7 (qwen3)
        ours = list(eng.generate_ids(toks, Sampling(temperature=0.0, repeat_penalty=1.0, max_tokens=32)))
    finally:
        eng.close()
    assert ours == ref_tokens[: len(ours)] and len(ours) >= 16


# ---- parallel equivalence, communication, memory -------------------------------------------------------------------

LAYOUTS = {
    "tp3": Layout((Stage(("a", "b", "c"), (0, 30), (1, 1, 1)),)),
    "tp2-uneven": Layout((Stage(("a", "b"), (0, 30), (2, 1)),)),
    "pipeline3": Layout((Stage(("a",), (0, 10), (3,)), Stage(("b",), (10, 20), (3,)), Stage(("c",), (20, 30), (3,)))),
    "hybrid": Layout((Stage(("a", "b"), (0, 20), (2, 1)), Stage(("c",), (20, 30), (3,)))),
}


def _run(model: str, layout: Layout | None, toks: list[int], weights: str | None = None, dtype: str | None = None,
         prefill_chunk: int | None = None) -> tuple[np.ndarray, list[int], dict, dict]:
    eng = TorchEngine(model, n_ctx=128, layout=layout, simulate=True, weights=weights, dtype=dtype,
                      prefill_chunk=prefill_chunk)
    try:
        logits = eng.logits(toks)
        tele_prompt = eng.sync_telemetry()
        out = list(eng.generate_ids(toks, Sampling(temperature=0.0, max_tokens=16)))
        return logits, out, {r: dict(t) for r, t in tele_prompt.items()}, dict(eng.ready)
    finally:
        eng.close()


def test_parallel_layouts_equal_tp1(smollm2: str) -> None:
    toks = [504, 3575, 282, 4649, 314, 7042, 30]
    base_logits, base_tokens, _t, base_ready = _run(smollm2, None, toks)
    n = len(toks)
    for name, layout in LAYOUTS.items():
        logits, tokens, tele, ready = _run(smollm2, layout, toks)
        assert _rel(logits, base_logits) < 1e-4, name  # measured 1e-6 to 3e-6
        assert tokens == base_tokens, name
        for i, stage in enumerate(layout.stages):
            for r in layout.ranks(i):
                layers = stage.layers[1] - stage.layers[0]
                # theory: per token and TP member, 2 all-reduces per layer of hidden x 4 bytes (float32)
                want = 2 * layers * 576 * 4 * n if stage.tp > 1 else 0
                assert tele[r]["layer_allreduce_bytes"] == want, (name, r)
        if len(layout.stages) > 1:
            first = layout.ranks(0)
            assert tele[layout.driver]["sent_bytes"] >= len(first) * n * 576 * 4  # embeddings to the first stage
        if name == "tp3":
            one = base_ready[0]["rss_anon_load_bytes"]
            for r in range(3):
                assert ready[r]["rss_anon_load_bytes"] <= 0.45 * one, (r, ready[r], one)
                assert ready[r]["weight_bytes"] <= 0.36 * base_ready[0]["weight_bytes"]


def test_pipelined_prefill_in_chunks_equals_one_pass(smollm2: str) -> None:
    """A prompt goes through in chunks, as llama.cpp's ubatches (with several stages, stage k on chunk i while
    stage k+1 is on chunk i-1): chunks of 3 over 7 tokens (3 + 3 + 1) in one process, the 3-stage pipeline and the
    hybrid give the one-pass logits for every position and the same greedy tokens, and every token's hidden state
    still reaches each next stage."""
    toks = [504, 3575, 282, 4649, 314, 7042, 30]
    base_logits, base_tokens, _t, _r = _run(smollm2, None, toks, prefill_chunk=len(toks))
    one_logits, one_tokens, _t, _r = _run(smollm2, None, toks, prefill_chunk=3)
    assert _rel(one_logits, base_logits) < 1e-4 and one_tokens == base_tokens
    for name in ("pipeline3", "hybrid"):
        layout = LAYOUTS[name]
        logits, tokens, tele, _r = _run(smollm2, layout, toks, prefill_chunk=3)
        assert logits.shape == base_logits.shape
        assert _rel(logits, base_logits) < 1e-4, name
        assert tokens == base_tokens, name
        for i in range(len(layout.stages) - 1):
            sender = layout.first_rank(i)
            assert tele[sender]["sent_bytes"] == len(layout.ranks(i + 1)) * len(toks) * 576 * 4, (name, i)


def test_gguf_blocks_kept_on_the_device_equal_dense_weights(smollm2: str) -> None:
    """GPU ranks keep quantized matrices in their GGUF blocks and dequantize each right before its product (torch
    code, so it runs on CPU ranks too): the same logits and tokens as float32 weights, TP=1 and the hybrid, at
    exactly the GGUF bytes the planner counts (the tied output is the embedding table, held once)."""
    from mixrun.model.gguf import read_spec

    toks = [504, 3575, 282, 4649, 314, 7042, 30]
    dense_logits, dense_tokens, _t, dense_ready = _run(smollm2, None, toks)
    for name, layout in (("tp1", None), ("hybrid", LAYOUTS["hybrid"])):
        logits, tokens, _t, ready = _run(smollm2, layout, toks, weights="blocks")
        assert _rel(logits, dense_logits) < 1e-5, name
        assert tokens == dense_tokens, name
        if name == "tp1":
            spec = read_spec(smollm2)
            assert spec.tied_output
            assert ready[0]["weight_bytes"] == spec.total_bytes
            assert ready[0]["weight_bytes"] < 0.3 * dense_ready[0]["weight_bytes"]
        # the fused kernels are for CUDA; CPU ranks expand (test_torch_kernels runs them on the CPU)
        assert not any(r["fused_kernels"] for r in ready.values()) and not any(r["note"] for r in ready.values())


def test_gguf_blocks_with_bias_and_untied_output_at_tp2(tmp_path: Path) -> None:
    """A Q8_0 qwen2 (QKV bias, its own output matrix) at TP=2 keeps every matrix in blocks: logits equal to dense
    weights, and each rank holds half the matrices and biases plus the replicated norm weights."""
    from mixrun.model.gguf import read_spec

    path = str(gguf_factory.write_model(tmp_path / "q8.gguf", "qwen2", n_layers=2, n_embd=128, n_head=4,
                                        n_head_kv=2, n_ff=256, n_vocab=64, tied=False, merges=True, seed=3,
                                        qtype="Q8_0"))
    layout = Layout((Stage(("a", "b"), (0, 2), (1, 1)),))
    toks = [1, 5, 9, 3, 7, 2]
    dense_logits, dense_tokens, _t, _r = _run(path, layout, toks)
    logits, tokens, _t, ready = _run(path, layout, toks, weights="blocks")
    assert np.array_equal(logits, dense_logits) and tokens == dense_tokens
    spec = read_spec(path)
    assert {t.qtype for t in spec.tensors if len(t.shape) == 2} == {"Q8_0"}
    norms = sum(t.n_bytes for t in spec.tensors if "norm" in t.name)
    per_rank = (spec.total_bytes - norms) // 2 + norms
    assert [ready[r]["weight_bytes"] for r in (0, 1)] == [per_rank, per_rank]


def test_the_gpu_configuration_on_cpu_ranks(smollm2: str) -> None:
    """What a GPU rank runs, bf16 activations and GGUF blocks, on CPU ranks in the hybrid layout: logits within
    bf16 precision of float32 TP=1, the same greedy tokens, and all-reduces of 2-byte elements."""
    toks = [504, 3575, 282, 4649, 314, 7042, 30]
    ref_logits, ref_tokens, _t, _r = _run(smollm2, None, toks)
    layout = LAYOUTS["hybrid"]
    logits, tokens, tele, _r = _run(smollm2, layout, toks, weights="blocks", dtype="bfloat16")
    assert _rel(logits, ref_logits) < 5e-2  # measured 2.5e-2
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).all()
    assert tokens == ref_tokens
    for r in layout.ranks(0):
        assert tele[r]["layer_allreduce_bytes"] == 2 * 20 * 576 * 2 * len(toks)


def test_two_hosts_on_loopback_through_torchrun(smollm2: str) -> None:
    """A plan over two hosts of a profile: each host's torchrun command (c10d rendezvous) runs on loopback, the
    workers connect back and get their ranks; the answer equals the single-process one."""
    from mixrun.backends.torch.launch import Slot, torchrun_commands
    from mixrun.rig.profile import load_profile

    prof = load_profile("two-hosts-2x3090-10gbe")
    slots = [Slot(0, "a.gpu0", "a", 0, "cuda:0"), Slot(1, "a.gpu1", "a", 1, "cuda:1"), Slot(2, "b.gpu0", "b", 0, "cuda:0")]
    cmds = torchrun_commands(slots, "ctl:5000", "a:29400")
    assert cmds["a"].startswith("torchrun --nnodes=2 --nproc-per-node=2 --rdzv-backend=c10d --rdzv-endpoint=a:29400")
    assert cmds["b"].endswith("--control ctl:5000 --host-id b") and "--nproc-per-node=1" in cmds["b"]
    layout = Layout((Stage(("a.gpu0", "a.gpu1"), (0, 15), (2, 1)), Stage(("b.gpu0",), (15, 30), (3,))))
    toks = [504, 3575, 282, 4649, 314]
    eng = TorchEngine(smollm2, n_ctx=64, layout=layout, profile=prof, simulate=True)
    try:
        assert any("2 hosts" in n for n in eng.info.notes) and all(k < 0 for k in eng.cluster.procs)
        two = list(eng.generate_ids(toks, Sampling(temperature=0.0, max_tokens=8)))
    finally:
        eng.close()
    one = TorchEngine(smollm2, n_ctx=64)
    try:
        assert list(one.generate_ids(toks, Sampling(temperature=0.0, max_tokens=8))) == two
    finally:
        one.close()


# ---- failures: every rank stops, the user sees the failing rank's error ----------------------------------------------


# Rank processes import this at start-up (the test puts its folder first on PYTHONPATH): rank N fails after loading,
# at its first barrier, while its peers wait for it. Production code has no hook for it.
FAIL_RANK_SITECUSTOMIZE = """
import contextlib
import os
if os.environ.get("MIXRUN_TEST_FAIL_RANK"):
    import torch.distributed as dist

    _barrier, _fail = dist.barrier, int(os.environ["MIXRUN_TEST_FAIL_RANK"])

    def barrier(*args, **kwargs):
        if dist.get_rank() == _fail:
            raise RuntimeError(f"injected failure on rank {_fail}")
        return _barrier(*args, **kwargs)

    dist.barrier = barrier
"""


@pytest.fixture
def fail_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Make rank ``n`` of the next engine's processes raise after loading."""
    (tmp_path / "sitecustomize.py").write_text(FAIL_RANK_SITECUSTOMIZE)

    def arm(n: int) -> None:
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
        monkeypatch.setenv("MIXRUN_TEST_FAIL_RANK", str(n))

    return arm


def test_exception_in_a_rank_stops_all(smollm2: str, fail_rank: Callable[[int], None]) -> None:
    t0 = time.monotonic()
    fail_rank(1)
    with pytest.raises(RuntimeFailure, match=r"rank 1 \(b\): RuntimeError: injected failure on rank 1"):
        TorchEngine(smollm2, n_ctx=64, layout=LAYOUTS["hybrid"], simulate=True)
    assert time.monotonic() - t0 < 120  # three processes start and load first
    me = psutil.Process()
    assert _gone([c.pid for c in me.children(recursive=True)], 10)


def test_sigkill_of_a_rank_stops_all(smollm2: str) -> None:
    eng = TorchEngine(smollm2, n_ctx=64, layout=LAYOUTS["pipeline3"], simulate=True)
    pids = [p.pid for p in eng.cluster.procs.values()]
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(RuntimeFailure, match=r"rank 1 \(b\) died.*signal 9"):
        list(eng.generate_ids([1, 2, 3], Sampling(temperature=0.0, max_tokens=8)))
    assert time.monotonic() - t0 < 10
    assert _gone(pids, 10)
    eng.close()


def test_ctrl_c_stops_every_rank(tmp_path: Path) -> None:
    """SIGINT to ``mixrun chat`` mid-answer: exit 130, every rank process gone within 10 s."""
    proc = subprocess.Popen([sys.executable, "-m", "mixrun.cli", "chat", "--backend", "torch", "--simulate",
                             "--profile", "dual-3090-nvlink-plus-3060", "--split", "hybrid", "--max-tokens", "2000",
                             "--prompt", "Write a very long story about a dragon."],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.read(1)  # the answer has started streaming
        assert first
        ranks = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert len(ranks) == 3
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert _gone(ranks, 10)


def _rank_process(rank: int, within_s: float) -> psutil.Process:
    """This test's local rank ``rank`` once it has connected to the controller."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error, ValueError, IndexError):
                cmd = p.cmdline()
                if "mixrun.backends.torch.worker" in cmd and cmd[cmd.index("--local-rank") + 1] == str(rank) \
                        and p.net_connections(kind="tcp"):
                    return p
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} never connected")


def test_sigstop_of_a_rank_during_generation_stops_all(smollm2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped rank sends no heartbeats: silent past the bound (3 s here, 10 s by default) it is named and every
    rank, the stopped one included, is gone; the others were waiting on it in a collective."""
    monkeypatch.setenv("MIXRUN_HANG_S", "3")
    eng = TorchEngine(smollm2, n_ctx=512, layout=LAYOUTS["hybrid"], simulate=True)
    pids = [p.pid for p in eng.cluster.procs.values()]
    gen = eng.generate_ids([1, 2, 3], Sampling(temperature=0.0, max_tokens=400))
    t0 = 0.0
    with pytest.raises(RuntimeFailure, match=r"rank 1 \(b\) stopped answering for [3-9] s: stopped every rank"):
        for i, _tok in enumerate(gen):
            if i == 2:
                os.kill(pids[1], signal.SIGSTOP)
                t0 = time.monotonic()
    assert t0 and time.monotonic() - t0 < 10
    assert _gone(pids, 10)
    eng.close()


def test_sigstop_of_a_rank_while_loading_stops_all(smollm2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank stopped during start-up, after it connected: the (wider) loading bound names it and every rank
    stops."""
    import threading

    monkeypatch.setenv("MIXRUN_HANG_S", "3,6")
    stopped: list[float] = []
    ranks: list[int] = []

    def stop_rank_1() -> None:
        p = _rank_process(1, 60)
        time.sleep(0.5)  # its hello is out
        ranks.extend(c.pid for c in psutil.Process().children(recursive=True))
        p.send_signal(signal.SIGSTOP)
        stopped.append(time.monotonic())

    t = threading.Thread(target=stop_rank_1, daemon=True)
    t.start()
    with pytest.raises(RuntimeFailure, match=r"rank 1 \(b\) stopped answering for [6-9] s: stopped every rank"):
        TorchEngine(smollm2, n_ctx=64, layout=LAYOUTS["hybrid"], simulate=True)
    t.join(5)
    assert stopped and time.monotonic() - stopped[0] < 20
    assert len(ranks) == 3 and _gone(ranks, 10)


def test_sigstop_of_a_rank_on_a_torchrun_host_stops_all(smollm2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two hosts on loopback: a stopped rank that torchrun started is named, and killed with the others rather than
    left behind, stopped, when its launcher goes."""
    from mixrun.rig.profile import load_profile

    monkeypatch.setenv("MIXRUN_HANG_S", "3")
    layout = Layout((Stage(("a.gpu0", "a.gpu1"), (0, 15), (2, 1)), Stage(("b.gpu0",), (15, 30), (3,))))
    eng = TorchEngine(smollm2, n_ctx=512, layout=layout, profile=load_profile("two-hosts-2x3090-10gbe"),
                      simulate=True)
    pids = [s.pid for s in eng.slots if s.pid] + [p.pid for p in eng.cluster.procs.values()]
    assert len(pids) == 5
    with pytest.raises(RuntimeFailure, match=r"rank 2 \(b.gpu0\) stopped answering for [3-9] s"):
        for i, _tok in enumerate(eng.generate_ids([1, 2, 3], Sampling(temperature=0.0, max_tokens=400))):
            if i == 2:
                os.kill(pids[2], signal.SIGSTOP)
    assert _gone(pids, 10)
    eng.close()
