"""The torch backend's mixture of experts (qwen3moe, glm4moe): the FFN against its formula, logits and greedy tokens
against llama.cpp on tiny random MoEs, expert parallelism inside a TP group and pipelines against one process, and
quantized experts kept in their GGUF blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from llama_reference import reference

import gguf_factory
from mixrun.alloc import allocate
from mixrun.backends.base import Sampling
from mixrun.backends.torch import weights
from mixrun.backends.torch.engine import TorchEngine
from mixrun.backends.torch.model import ModelConfig, Transformer
from mixrun.backends.torch.moe import MoEFeedForward
from mixrun.backends.torch.parallel import Comm, Layout, Stage, apply_tp, expert_counts
from mixrun.backends.torch.step import FoldedStep
from mixrun.model.gguf import TensorFile, read_spec
from mixrun.planner import PlanRequest, plan
from mixrun.rig.profile import load_profile
from mixrun.vocab import BACKEND_ARCHS, Backend

TOKS = [1, 5, 9, 3, 7, 2, 11, 4]
GREEDY = Sampling(temperature=0.0, repeat_penalty=1.0, max_tokens=16)




def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _cfg(n_expert: int = 6, used: int = 3, n_head_kv: int = 4) -> ModelConfig:
    return ModelConfig("qwen3moe", 2, 64, 4, n_head_kv, 32, 96, 64, 1e-6, 1e4, 32, True, False, True, False,
                       n_expert=n_expert, n_expert_used=used, n_ff_exp=32)


# ---- the FFN -------------------------------------------------------------------------------------------------------


def _formula(ffn: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's build_moe_ffn for qwen3moe written out densely: every expert on every token, the top-k
    probabilities renormalized, all other weights zero."""
    n, f = ffn.n_expert, ffn.ffn
    probs = torch.softmax(x @ ffn.router.weight.t(), dim=-1)  # (T, n)
    top = torch.topk(probs, ffn.n_used, dim=-1)
    w = torch.zeros_like(probs).scatter_(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    gate = ffn.gate_exps.weight.view(n, f, -1)  # (n, f, dim)
    up = ffn.up_exps.weight.view(n, f, -1)
    down = ffn.down_exps.weight.view(n, -1, f)  # (n, dim, f)
    h = F.silu(torch.einsum("nfd,td->tnf", gate, x)) * torch.einsum("nfd,td->tnf", up, x)  # (T, n, f)
    return torch.einsum("ndf,tnf,tn->td", down, h, w)


def _slice(full: MoEFeedForward, cfg: ModelConfig, first: int, n: int) -> MoEFeedForward:
    """Experts ``[first, first + n)`` of ``full``, as apply_tp gives a TP member, the router whole."""
    part = MoEFeedForward(cfg, first, n)
    f, d = cfg.n_ff_exp, cfg.dim
    with torch.no_grad():
        part.router.weight.copy_(full.router.weight)
        part.gate_exps.weight.copy_(full.gate_exps.weight[first * f:(first + n) * f])
        part.up_exps.weight.copy_(full.up_exps.weight[first * f:(first + n) * f])
        part.down_exps.weight.copy_(full.down_exps.weight[first * d:(first + n) * d])
    part.prepare(torch.device("cpu"), 1)
    return part


def test_moe_ffn_is_the_formula_and_expert_slices_sum_to_it() -> None:
    """Prompt rows (each expert over the rows that chose it) and one-token steps give the dense formula; the
    outputs of contiguous expert slices (TP members' partial sums, uneven) add up to the whole; a one-token step
    reads only its chosen experts' matrices (the others are NaN here)."""
    torch.manual_seed(0)
    cfg = _cfg()
    ffn = MoEFeedForward(cfg)
    ffn.prepare(torch.device("cpu"), 1)
    x = torch.randn(7, cfg.dim)
    with torch.inference_mode():
        want = _formula(ffn, x)
        assert torch.allclose(ffn(x), want, atol=1e-5)
        assert torch.allclose(torch.cat([ffn(x[i:i + 1]) for i in range(7)]), want, atol=1e-5)
        assert torch.allclose(ffn(x, add=x), want + x, atol=1e-5)
        chosen = ffn.choose(x)[1]
        assert len(set(chosen.flatten().tolist())) > cfg.n_expert_used  # the tokens do not all pick the same
        parts = [_slice(ffn, cfg, a, b - a) for a, b in ((0, 4), (4, 5), (5, 6), (6, 6))]  # the last holds none
        assert torch.allclose(sum(p(x) for p in parts), want, atol=1e-5)
        assert torch.allclose(sum(p(x[:1]) for p in parts), want[:1], atol=1e-5)
    unused = sorted(set(range(cfg.n_expert)) - set(chosen[0].tolist()))
    with torch.no_grad():
        for e in unused:
            ffn.gate_exps.weight[e * cfg.n_ff_exp:(e + 1) * cfg.n_ff_exp] = float("nan")
    with torch.inference_mode():
        assert torch.allclose(ffn(x[:1]), want[:1], atol=1e-5)


def test_experts_follow_the_plans_kv_shares(tmp_path: Path) -> None:
    """Each TP member holds a contiguous run of whole experts sized like its FFN share (by its KV heads, at least
    one each) and the whole router; the GGUF slices it reads are those experts' rows."""
    cfg = _cfg()
    stage = Stage(("a", "b"), (0, 2), (3, 1))
    assert expert_counts(cfg, stage) == allocate(6, [3, 1], minimum=1) == [4, 2]
    # fewer experts than members: some hold none (their partial sums are zero)
    assert expert_counts(_cfg(n_expert=2, used=1), Stage(("a", "b", "c"), (0, 2), (2, 1, 1))) == [1, 1, 0]
    for member, (first, n) in enumerate(((0, 4), (4, 2))):
        with torch.device("meta"):
            model = Transformer(cfg, (0, 2), head=False, max_pos=8)
        shards = apply_tp(model, stage, member, Comm(None, 2))
        ffn = model.layers[1].ffn
        assert isinstance(ffn, MoEFeedForward) and (ffn.first, ffn.n_local) == (first, n)
        assert ffn.router.weight.shape == (6, 64) and ffn.gate_exps.weight.shape == (n * 32, 64)
        gate = shards["layers.1.ffn.gate_exps.weight"][0]
        down = shards["layers.1.ffn.down_exps.weight"][0]
        assert (gate.start, gate.stop, down.start, down.stop) == (first * 32, (first + n) * 32, first * 64,
                                                                  (first + n) * 64)
        assert "layers.1.ffn.router.weight" not in shards


# ---- against llama.cpp and across layouts ------------------------------------------------------------------------


def test_tiny_qwen3moe_matches_llamacpp(tmp_path: Path) -> None:
    """The tiny random qwen3moe (4 experts, 2 used; QK norm, NEOX RoPE), offered to the torch backend: logits
    within the dense models' bound of llama.cpp's and the same 16 greedy tokens."""
    assert "qwen3moe" in BACKEND_ARCHS[Backend.TORCH]
    path = gguf_factory.write_moe_model(tmp_path / "qwen3moe.gguf", "qwen3moe")
    ref_logits, ref_tokens = reference(path, TOKS, 16, 64)
    eng = TorchEngine(str(path), n_ctx=64)
    try:
        assert _rel(eng.logits(TOKS), ref_logits) < 1e-5  # measured 4.9e-7
        ours = list(eng.generate_ids(TOKS, GREEDY))
    finally:
        eng.close()
    assert ours == ref_tokens and len(ours) == 16


LAYOUTS = {  # 4 layers, 4 KV heads, 6 experts: members hold [4, 2], [2, 4] (by KV heads 3:1, 1:3) or all 6
    "tp2-uneven": Layout((Stage(("a", "b"), (0, 4), (3, 1)),)),
    "pipeline2": Layout((Stage(("a",), (0, 2), (4,)), Stage(("b",), (2, 4), (4,)))),
    "hybrid": Layout((Stage(("a", "b"), (0, 3), (1, 3)), Stage(("c",), (3, 4), (4,)))),
}


def _run(path: str, layout: Layout | None, weights: str | None = None,
         dtype: str | None = None) -> tuple[np.ndarray, list[int], dict, dict]:
    eng = TorchEngine(path, n_ctx=64, layout=layout, simulate=layout is not None, weights=weights, dtype=dtype)
    try:
        logits = eng.logits(TOKS)
        tele = {r: dict(t) for r, t in eng.sync_telemetry().items()}
        return logits, list(eng.generate_ids(TOKS, GREEDY)), tele, dict(eng.ready)
    finally:
        eng.close()


def test_expert_parallel_and_pipelines_equal_one_process(tmp_path: Path) -> None:
    """Gloo CPU ranks, one per planned device: expert parallelism inside TP groups (uneven, and as the planner
    sizes it) and pipeline stages give the one-process logits and greedy tokens, which equal llama.cpp's; a TP member all-reduces the attention
    and the experts' outputs once per layer each, as a dense layer does, and holds only its experts."""
    moe = gguf_factory.MoEShape(n_expert=6, n_expert_used=3, n_ff_exp=32)
    path = str(gguf_factory.write_moe_model(tmp_path / "moe6.gguf", "qwen3moe", n_layers=4, n_head_kv=4, moe=moe,
                                            seed=11))
    ref_logits, ref_tokens = reference(Path(path), TOKS, 16, 64)
    base_logits, base_tokens, _t, base_ready = _run(path, None)
    assert _rel(base_logits, ref_logits) < 1e-5  # measured 5.5e-7
    assert base_tokens == ref_tokens
    planned = plan(load_profile("dual-3090-nvlink-plus-3060"), read_spec(path),
                   PlanRequest(backend="torch", split="tensor")).best
    assert planned is not None and planned.backend == Backend.TORCH
    layouts = {**LAYOUTS, "planned": Layout.from_groups(planned.groups, 4)}
    for name, layout in layouts.items():
        logits, tokens, tele, ready = _run(path, layout)
        assert _rel(logits, base_logits) < 1e-5, name  # measured 2.6e-7 to 3.7e-7
        assert tokens == base_tokens, name
        for i, stage in enumerate(layout.stages):
            for r in layout.ranks(i):
                want = 2 * (stage.layers[1] - stage.layers[0]) * 64 * 4 * len(TOKS) if stage.tp > 1 else 0
                assert tele[r]["layer_allreduce_bytes"] == want, (name, r)
        if name == "tp2-uneven":  # each expert on one member; the router and norms on both
            spec = TensorFile(path).spec
            both = sum(4 * t.n_elements for t in spec.tensors if "norm" in t.name or "gate_inp" in t.name)
            assert ready[0]["weight_bytes"] + ready[1]["weight_bytes"] == base_ready[0]["weight_bytes"] + both


def test_the_gpu_configuration_on_cpu_ranks(tmp_path: Path) -> None:
    """What GPU ranks run, bf16 activations and Q8_0 experts in GGUF blocks (the rest F32, so the embedding and
    output are dense bf16), in the hybrid layout on CPU ranks: logits within bf16 precision of llama.cpp's, the
    same argmax everywhere and the same greedy tokens."""
    moe = gguf_factory.MoEShape(n_expert=6, n_expert_used=3, n_ff_exp=32, expert_qtype="Q8_0")
    path = str(gguf_factory.write_moe_model(tmp_path / "q8.gguf", "qwen3moe", n_layers=4, n_head_kv=4, moe=moe,
                                            seed=11))
    ref_logits, ref_tokens = reference(Path(path), TOKS, 16, 64)
    logits, tokens, tele, _r = _run(path, LAYOUTS["hybrid"], weights="blocks", dtype="bfloat16")
    assert _rel(logits, ref_logits) < 5e-2  # measured 3.2e-2 (float32 ranks: 1.0e-3, llama.cpp's Q8_0 activations)
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).all() and tokens == ref_tokens
    assert tele[0]["layer_allreduce_bytes"] == 2 * 3 * 64 * 2 * len(TOKS)  # 2-byte elements


def test_quantized_experts_in_gguf_blocks_equal_dense(tmp_path: Path) -> None:
    """Q8_0 experts kept in their GGUF blocks (what a GPU rank holds; each expert's rows dequantized before its
    product) give the dense float32 part's logits, prompt and one-token steps, at the GGUF's expert bytes."""
    moe = gguf_factory.MoEShape(n_expert=4, n_expert_used=2, n_ff_exp=32, expert_qtype="Q8_0")
    path = gguf_factory.write_moe_model(tmp_path / "q8.gguf", "qwen3moe", moe=moe)
    tf = TensorFile(str(path))
    cfg = ModelConfig.from_gguf(tf.spec, tf.fields)
    stage = Stage(("cpu",), (0, cfg.n_layers), (cfg.n_head_kv,))
    parts = {}
    for blocks in (False, True):
        parts[blocks] = weights.build_part(tf, cfg, stage, 0, Comm(None, 1), head=True, max_pos=32,
                                           dtype=torch.float32, device=torch.device("cpu"), blocks=blocks)
    (dense, dense_bytes), (kept, kept_bytes) = parts[False], parts[True]
    ffn = kept.layers[0].ffn
    assert isinstance(ffn, MoEFeedForward) and ffn.gate_exps.blocks[0][0].dtype == torch.uint8
    assert isinstance(dense.step, FoldedStep)  # routed experts decode through their own forward
    exps = sum(t.n_bytes for t in tf.spec.tensors if t.name.endswith("_exps.weight"))
    assert dense_bytes - kept_bytes == sum(4 * t.n_elements for t in tf.spec.tensors
                                           if t.name.endswith("_exps.weight")) - exps
    with torch.inference_mode():
        ids = torch.tensor(TOKS)
        a, b = dense.logits(dense(dense.embed_tokens(ids), 0)), kept.logits(kept(kept.embed_tokens(ids), 0))
        assert _rel(b.numpy(), a.numpy()) < 1e-5
        tok = a[-1:].argmax(-1)
        a = dense.logits(dense(dense.embed_tokens(tok), len(TOKS)))
        b = kept.logits(kept(kept.embed_tokens(tok), len(TOKS)))
        assert _rel(b.numpy(), a.numpy()) < 1e-5


# ---- glm4moe: sigmoid routing with a selection bias, a shared expert, leading dense layers, partial RoPE ----------

GLM_MOE = gguf_factory.MoEShape(n_expert=6, n_expert_used=3, n_ff_exp=32, n_expert_shared=1, n_dense_lead=1)


def test_tiny_glm4moe_matches_llamacpp(tmp_path: Path) -> None:
    """GLM-4.5's layer: QKV bias, RoPE over half of each head (NEOX), a dense first layer, sigmoid router
    probabilities chosen with exp_probs_b and weighed without it, a shared expert. With the weights normalized
    and scaled (GLM-4.5: 2.5) and without (the defaults), and with a trailing NextN layer, which neither llama.cpp's
    main graph nor the torch backend runs: logits within the dense models' bound of llama.cpp's, the same 16 greedy
    tokens."""
    assert "glm4moe" in BACKEND_ARCHS[Backend.TORCH]
    cases = {"norm-scale": {"glm4moe.expert_weights_norm": True, "glm4moe.expert_weights_scale": 2.5},
             "defaults": {}, "nextn": {"glm4moe.nextn_predict_layers": 1}}
    for name, extra in cases.items():
        path = gguf_factory.write_moe_model(tmp_path / f"glm-{name}.gguf", "glm4moe", n_layers=4, n_head_kv=4,
                                            moe=GLM_MOE, seed=11, rope_dim=16, extra_kv=extra)
        ref_logits, ref_tokens = reference(path, TOKS, 16, 64)
        eng = TorchEngine(str(path), n_ctx=64)
        try:
            assert _rel(eng.logits(TOKS), ref_logits) < 1e-5, name  # measured 4.3e-7 to 7.0e-7
            ours = list(eng.generate_ids(TOKS, GREEDY))
        finally:
            eng.close()
        assert ours == ref_tokens and len(ours) == 16, name


def test_glm4moe_expert_parallel_and_pipelines_match_llamacpp(tmp_path: Path) -> None:
    """Gloo CPU ranks: the shared expert's rows split like a dense FFN's and the routed experts by member inside a
    TP group (uneven), and a hybrid of TP and a pipeline, give llama.cpp's logits and greedy tokens."""
    path = str(gguf_factory.write_moe_model(tmp_path / "glm.gguf", "glm4moe", n_layers=4, n_head_kv=4, moe=GLM_MOE,
                                            seed=11, rope_dim=16))
    ref_logits, ref_tokens = reference(Path(path), TOKS, 16, 64)
    for name in ("tp2-uneven", "hybrid"):
        logits, tokens, _tele, _ready = _run(path, LAYOUTS[name])
        assert _rel(logits, ref_logits) < 1e-5, name  # measured 3.8e-7, 4.0e-7
        assert tokens == ref_tokens, name


# ---- gpt-oss: sinks, sliding windows, YaRN, biases, SwiGLU-OAI, softmax over the chosen logits --------------------

OSS_YARN = {"gpt-oss.rope.scaling.type": "yarn", "gpt-oss.rope.scaling.factor": 32.0,
            "gpt-oss.rope.scaling.original_context_length": 16}


def test_tiny_gpt_oss_matches_llamacpp(tmp_path: Path) -> None:
    """gpt-oss's layer: QKV and output biases, a sink logit per head, sliding-window attention on even layers
    (a 4-token window here, so the 8-token prompt and 16 generated tokens leave it), NEOX RoPE with YaRN (factor 32
    over 16 original positions: interpolated, ramped and magnitude-scaled angles), router and expert biases, the
    clamped SwiGLU-OAI, the chosen experts weighed by a softmax of their logits. F32 experts: logits within the
    dense bound of llama.cpp's; MXFP4 experts, as OpenAI ships them: llama.cpp multiplies those with Q8_0
    activations, so within its quantization error, and the same greedy tokens."""
    assert "gpt-oss" in BACKEND_ARCHS[Backend.TORCH]
    f32 = gguf_factory.MoEShape(n_expert=4, n_expert_used=2, n_ff_exp=64)
    cases = {"plain": (f32, {}, 1e-5), "window": (f32, {"sliding_window": 4}, 1e-5),
             "yarn": (f32, {"sliding_window": 4, "extra_kv": OSS_YARN}, 1e-5),
             "mxfp4": (None, {"sliding_window": 4, "extra_kv": OSS_YARN}, 5e-3)}
    for name, (moe, kw, bound) in cases.items():
        extra = {"moe": moe} if moe is not None else {}
        path = gguf_factory.write_moe_model(tmp_path / f"oss-{name}.gguf", "gpt-oss", seed=5, **extra, **kw)
        ref_logits, ref_tokens = reference(path, TOKS, 16, 64)
        eng = TorchEngine(str(path), n_ctx=64)
        try:
            assert _rel(eng.logits(TOKS), ref_logits) < bound, name  # measured 3.9e-7 to 4.4e-7; MXFP4 1.2e-3
            ours = list(eng.generate_ids(TOKS, GREEDY))
        finally:
            eng.close()
        assert ours == ref_tokens and len(ours) == 16, name


def test_gpt_oss_expert_parallel_and_pipelines_match_llamacpp(tmp_path: Path) -> None:
    """Gloo CPU ranks: the sinks split with their query heads, the output bias added by one TP member only, each
    member's experts with their biases; TP 2 uneven and a hybrid give llama.cpp's logits and greedy tokens."""
    moe = gguf_factory.MoEShape(n_expert=6, n_expert_used=3, n_ff_exp=32)
    path = str(gguf_factory.write_moe_model(tmp_path / "oss.gguf", "gpt-oss", n_layers=4, n_head_kv=4, moe=moe,
                                            seed=11, sliding_window=4, extra_kv=OSS_YARN))
    ref_logits, ref_tokens = reference(Path(path), TOKS, 16, 64)
    for name in ("tp2-uneven", "hybrid"):
        logits, tokens, _tele, _ready = _run(path, LAYOUTS[name])
        assert _rel(logits, ref_logits) < 1e-5, name  # measured 2.3e-7, 2.9e-7
        assert tokens == ref_tokens, name


def test_gpu_ranks_keep_the_block_types_the_planner_counts(tmp_path: Path) -> None:
    """The quant types the torch backend keeps in GGUF blocks on a GPU are the ones the planner counts at their
    GGUF bytes (vocab.TORCH_BLOCK_TYPES); an MXFP4 expert, which it expands to bf16 as it loads, is planned at
    2 bytes a weight."""
    from mixrun.backends.torch import quant
    from mixrun.planner.candidates import torch_gpu_spec
    from mixrun.vocab import TORCH_BLOCK_TYPES

    assert {t.name for t in quant._BLOCKS} == TORCH_BLOCK_TYPES
    spec = read_spec(gguf_factory.write_moe_model(tmp_path / "oss.gguf", "gpt-oss"))
    gpu = torch_gpu_spec(spec)
    for t, g in zip(spec.tensors, gpu.tensors, strict=True):
        assert g.n_bytes == (2 * t.n_elements if t.qtype == "MXFP4" else t.n_bytes), t.name
    assert gpu.total_bytes > spec.total_bytes
    best = plan(load_profile("dual-3090-nvlink"), spec, PlanRequest(backend="torch")).best
    assert best is not None and sum(d.weights_bytes for d in best.devices) >= gpu.total_bytes - spec.other_bytes.get(
        "token_embd.weight", 0)
