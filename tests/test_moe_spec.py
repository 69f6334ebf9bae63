"""Mixture-of-experts models read into a ModelSpec: expert counts and bytes, the KV cache per architecture, checked
against llama.cpp's own buffer report on tiny random MoE GGUFs, and full-size sparse shapes against the published
figures."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGUFValueType, GGUFWriter, Keys

import gguf_factory
from gguf_factory import MoEShape
from mixrun.errors import GGUFError
from mixrun.model.gguf import read_spec
from mixrun.model.spec import ModelSpec

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import llamacpp_memory  # noqa: E402

GB, GIB = 10**9, 2**30
TINY = tuple(gguf_factory.TINY_MOE)  # qwen3moe, gpt-oss, glm4moe, deepseek2: llama.cpp loads all four


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("moe")
    return {arch: gguf_factory.write_moe_model(folder / f"tiny-{arch}.gguf", arch) for arch in TINY}


def _bytes(spec: ModelSpec, layer: int, *stems: str) -> int:
    return sum(t.n_bytes for t in spec.tensors if t.layer == layer and t.base in stems)


# ---- counts and bytes from the tiny files -------------------------------------------------------------------------

@pytest.mark.parametrize("arch", TINY)
def test_counts_and_bytes(tiny_moe: dict[str, Path], arch: str) -> None:
    spec = read_spec(tiny_moe[arch])
    moe: MoEShape = gguf_factory.TINY_MOE[arch]["moe"]
    assert spec.is_moe and spec.arch == arch
    assert (spec.n_expert, spec.n_expert_used, spec.n_expert_shared) == (4, 2, moe.n_expert_shared)
    assert (spec.n_ff_exp, spec.n_layer_dense_lead, spec.n_layer_nextn) == (moe.n_ff_exp, moe.n_dense_lead, 0)
    lead = moe.n_dense_lead
    assert spec.layer_expert_used == (0,) * lead + (2,) * (spec.n_layers - lead)
    routed = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_up_exps")
    for i in range(spec.n_layers):
        assert spec.layer_expert_bytes[i] == _bytes(spec, i, *routed)
        assert spec.layer_dense_bytes[i] == spec.layer_bytes[i] - spec.layer_expert_bytes[i]
        assert spec.layer_shared_expert_bytes[i] == _bytes(spec, i, "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")
        assert spec.layer_router_bytes[i] == _bytes(spec, i, "ffn_gate_inp", "exp_probs_b")
        assert spec.layer_decode_bytes[i] == spec.layer_dense_bytes[i] + spec.layer_expert_bytes[i] // 2
        if i < lead:
            assert spec.layer_expert_bytes[i] == 0 and spec.layer_router_bytes[i] == 0
        else:
            assert spec.layer_expert_bytes[i] > 0 and spec.layer_router_bytes[i] > 0
            assert (spec.layer_shared_expert_bytes[i] > 0) == bool(moe.n_expert_shared)
    assert spec.expert_bytes == sum(spec.layer_expert_bytes)
    assert spec.decode_read_bytes() == sum(spec.layer_decode_bytes) + spec.other_bytes["output.weight"] \
        + spec.other_bytes["output_norm.weight"]
    assert spec.decode_read_bytes(range(1, 2)) == spec.layer_decode_bytes[1]
    expert_elems = sum(t.n_elements for t in spec.tensors if t.routed_expert)
    assert spec.n_active_params == spec.n_params - expert_elems // 2
    if arch == "gpt-oss":  # MXFP4 experts (biases F32), sinks, even layers sliding
        assert {t.qtype for t in spec.tensors if t.name.endswith("_exps.weight")} == {"MXFP4"}
        assert any(t.base == "attn_sinks" for t in spec.tensors)
        assert [kv.sliding for kv in spec.kv_layers] == [True, False, True, False]
    if arch == "deepseek2":  # MLA: one latent of kv_lora_rank + rope per token and layer, no V
        assert spec.kv_lora_rank == 32 and spec.kv_note is None
        assert {(kv.n_head_kv, kv.k_dim, kv.v_dim) for kv in spec.kv_layers} == {(1, 48, 0)}
        assert spec.kv_bytes_per_token("f16") == 3 * 48 * 2
    js = spec.to_json(with_tensors=False)
    assert js["moe"]["n_expert"] == 4 and js["moe"]["expert_bytes"] == spec.expert_bytes
    assert js["n_active_params"] == spec.n_active_params


def test_dense_models_are_unchanged(tiny_llama: Path) -> None:
    spec = read_spec(tiny_llama)
    assert not spec.is_moe and spec.n_expert == 0 and spec.layer_expert_used == ()
    assert spec.layer_expert_bytes == (0,) * spec.n_layers and spec.layer_dense_bytes == spec.layer_bytes
    assert spec.layer_decode_bytes == spec.layer_bytes and spec.n_active_params == spec.n_params
    assert spec.expert_share == 0.0 and spec.to_json()["moe"] is None


def test_nextn_layers_have_no_kv(tmp_path: Path) -> None:
    """llama.cpp's main context filters its cache to il < n_layer(): a trailing MTP layer costs no KV."""
    path = gguf_factory.write_moe_model(tmp_path / "glm.gguf", "glm4moe",
                                        extra_kv={"glm4moe.nextn_predict_layers": 1})
    spec = read_spec(path)
    assert spec.n_layer_nextn == 1 and spec.kv_layers[-1].n_head_kv == 0
    assert spec.kv_bytes_per_token("f16") == 2 * 2 * 32 * 2 * 2


def test_mla_keys_count_only_for_deepseek2(tmp_path: Path) -> None:
    """Only deepseek2 reads its MLA keys into a latent cache; an architecture whose cache llama.cpp builds another
    way says its KV is approximate."""
    mla = {"qwen3moe.attention.key_length_mla": 48, "qwen3moe.attention.value_length_mla": 32,
           "qwen3moe.attention.kv_lora_rank": 32}
    spec = read_spec(gguf_factory.write_moe_model(tmp_path / "q.gguf", "qwen3moe", extra_kv=mla))
    assert spec.kv_lora_rank == 0 and spec.kv_bytes_per_token("f16") == 2 * 2 * 32 * 2 * 2 and spec.kv_note is None
    other = read_spec(gguf_factory.write_model(tmp_path / "dsa.gguf", "deepseek32"))
    assert other.kv_note is not None and "approximate" in other.kv_note


# ---- llama.cpp's own report ---------------------------------------------------------------------------------------

def _mapped_bytes(spec: ModelSpec) -> int:
    """The mapped file range llama.cpp reports as its CPU_Mapped buffer: every tensor but the last padded to the
    GGUF's 32-byte alignment."""
    sizes = [t.n_bytes for t in spec.tensors]
    return sum(-(-b // 32) * 32 for b in sizes[:-1]) + sizes[-1]


@pytest.fixture(scope="module")
def shim() -> str | bool:
    return llamacpp_memory.build_breakdown_shim() or False


@pytest.mark.parametrize("arch", TINY)
def test_weights_and_kv_match_llamacpp(tiny_moe: dict[str, Path], arch: str, shim: str | bool) -> None:
    """Load for real (extra buffers off: every weight in the mapped file). Weights: llama_model_size (the sum of
    ggml_nbytes) equals total_bytes, and the logged buffer is the mapped range. KV: the logged cache (and, with the
    breakdown shim, its exact size) equals cells x kv_bytes_per_token per layer, sliding layers holding the window
    plus a ubatch (128 + 128 cells here, a multiple of any padding llama.cpp applies)."""
    pytest.importorskip("llama_cpp")
    spec = read_spec(tiny_moe[arch])
    res = llamacpp_memory.llamacpp_buffers(str(tiny_moe[arch]), 512, n_batch=128, n_ubatch=128, swa_full=False,
                                           extra_buffers=False, exact=shim, timeout=120)
    assert res["model_size"] == spec.total_bytes and res["n_params"] == spec.n_params
    assert abs(res["weights_CPU_Mapped"] - _mapped_bytes(spec)) <= llamacpp_memory.LOG_PRECISION_BYTES
    assert res["hp_n_swa"] == (spec.sliding_window or 0)
    kv = sum((256 if layer.sliding else 512) * spec.kv_bytes_per_token("f16", range(i, i + 1))
             for i, layer in enumerate(spec.kv_layers))
    n_logged = 1 + any(layer.sliding for layer in spec.kv_layers)
    assert abs(res["kv"] - kv) <= n_logged * llamacpp_memory.LOG_PRECISION_BYTES
    if arch == "deepseek2":
        assert res["kv_v"] == 0  # MLA: no V cache
    if shim:
        assert res["exact_model"] == _mapped_bytes(spec)
        assert res["exact_context"] == kv


ANSWER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import llama_cpp
    from llama_cpp import llama_cpp as low
    defaults = low.llama_model_default_params
    def no_extra():  # weights stay in the mapped file: no repacking on hosts whose repacked path is unsafe
        p = defaults()
        p.use_extra_bufts = False
        return p
    low.llama_model_default_params = no_extra
    llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_batch=16, n_ubatch=16, verbose=False)
    prompt = [1, 2, 3]  # token ids: the tiny vocabulary ("t0".."t63") has no byte tokens to spell text with
    llm.eval(prompt)
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    logits = np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float64)
    text = llm.create_completion(prompt, max_tokens=1, temperature=0.0)["choices"][0]["text"]
    print(json.dumps({"token": int(np.argmax(logits)), "finite": bool(np.isfinite(logits).all()),
                      "spread": float(logits.max() - logits.min()), "n_vocab": llm.n_vocab(), "text": text}))
""")


@pytest.mark.parametrize("arch", TINY)
def test_each_tiny_model_answers(tiny_moe: dict[str, Path], arch: str) -> None:
    """One greedy token through llama.cpp: finite logits that are not all equal, and the completion's one token is
    their argmax."""
    pytest.importorskip("llama_cpp")
    out = subprocess.run([sys.executable, "-c", ANSWER, str(tiny_moe[arch])], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ans: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    assert ans["finite"] and ans["spread"] > 0 and ans["n_vocab"] == 64
    assert ans["text"] == f"t{ans['token']}"


# ---- full-size sparse shapes against the published figures -------------------------------------------------------

@pytest.mark.parametrize(
    ("name", "arch", "qtype", "params_b", "active_b", "lo", "hi"),
    [
        # Qwen3-30B-A3B model card: 30.5B total, 3.3B activated; Q4_K_M GGUFs (unsloth, bartowski) are 18.6 GB
        ("QWEN3_30B_A3B", "qwen3moe", "Q4_K_M", 30.5, 3.3, 18.0 * GB, 19.0 * GB),
        # Qwen3-235B-A22B model card: 235B total, 22B activated; Q4_K_M GGUFs are ~142 GB
        ("QWEN3_235B_A22B", "qwen3moe", "Q4_K_M", 235.0, 22.0, 138 * GB, 146 * GB),
        # gpt-oss-120b model card: 116.83B total, 5.13B active (without the 0.58B input embedding, which the
        # A3B-style count here includes), checkpoint 60.8 GiB: MXFP4 experts, BF16 elsewhere
        ("GPT_OSS_120B", "gpt-oss", "BF16", 116.83, 5.13 + 0.58, 60.0 * GIB, 61.5 * GIB),
    ],
)
def test_full_size_shapes_match_published_figures(tmp_path: Path, name: str, arch: str, qtype: str,
                                                  params_b: float, active_b: float, lo: float, hi: float) -> None:
    shape: dict[str, Any] = getattr(gguf_factory, name)
    spec = read_spec(gguf_factory.write_model(tmp_path / f"{name}.gguf", arch, qtype=qtype, sparse=True, **shape))
    moe: MoEShape = shape["moe"]
    assert (spec.n_layers, spec.n_expert, spec.n_expert_used) == (shape["n_layers"], moe.n_expert, moe.n_expert_used)
    assert abs(spec.n_params / 1e9 - params_b) <= 0.01 * params_b
    assert abs(spec.n_active_params / 1e9 - active_b) <= 0.03 * active_b
    assert lo <= spec.total_bytes <= hi
    assert spec.expert_share > 0.9  # the experts are almost all of the bytes
    assert spec.decode_read_bytes() < 0.15 * spec.total_bytes
    if arch == "gpt-oss":
        assert sum(kv.sliding for kv in spec.kv_layers) == 18 and spec.sliding_window == 128
        assert spec.kv_bytes_per_token("f16") == 36 * 8 * 64 * 2 * 2
    else:
        assert spec.kv_bytes_per_token("f16") == spec.n_layers * 4 * 128 * 2 * 2


# ---- hostile counts -----------------------------------------------------------------------------------------------

def _copy_with(src: Path, dst: Path, drop: tuple[str, ...] = (), **changes: int) -> Path:
    """The same GGUF (F32 tensors) with some integer metadata set to other values, and the keys in ``drop`` left
    out."""
    r = gguf.GGUFReader(str(src))
    w = GGUFWriter(str(dst), r.fields[Keys.General.ARCHITECTURE].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == Keys.General.ARCHITECTURE or key in drop:
            continue
        vtype = f.types[0]
        if key in changes:
            w.add_key_value(key, changes.pop(key), GGUFValueType.UINT32)
        else:
            w.add_key_value(key, f.contents(), vtype, sub_type=f.types[1] if vtype == GGUFValueType.ARRAY else None)
    for key, value in changes.items():
        w.add_key_value(key, value, GGUFValueType.UINT32)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data).reshape(tuple(int(d) for d in reversed(t.shape.tolist()))))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"qwen3moe.expert_used_count": 5}, "expert_used_count is 5, more than qwen3moe.expert_count = 4"),
        ({"qwen3moe.expert_count": 0}, "holds experts but qwen3moe.expert_count is 0"),
        ({"qwen3moe.expert_count": 10**9}, "qwen3moe.expert_count is 1,000,000,000, outside 0..1,024"),
        ({"qwen3moe.expert_count": 8}, "but the metadata say 8 experts"),
        ({"qwen3moe.expert_used_count": 0}, "layer 0 has experts but qwen3moe.expert_used_count is 0"),
        ({"qwen3moe.expert_used_count": 10**9}, "qwen3moe.expert_used_count is 1,000,000,000, outside"),
        ({"qwen3moe.leading_dense_block_count": 3}, "leading_dense_block_count is 3, outside 0..2"),
    ],
)
def test_hostile_counts_are_one_line_errors(tiny_moe: dict[str, Path], tmp_path: Path, changes: dict[str, int],
                                            message: str) -> None:
    path = _copy_with(tiny_moe["qwen3moe"], tmp_path / "bad.gguf", **changes)
    with pytest.raises(GGUFError) as e:
        read_spec(path)
    text = str(e.value)
    assert message in text and "\n" not in text and "bad.gguf" in text


def test_a_missing_expert_count_is_an_error(tmp_path: Path) -> None:
    path = gguf_factory.write_moe_model(tmp_path / "no-count.gguf", "qwen3moe")
    r = gguf.GGUFReader(str(path))
    assert Keys.LLM.EXPERT_COUNT.format(arch="qwen3moe") in r.fields
    dst = _copy_with(path, tmp_path / "stripped.gguf", drop=(Keys.LLM.EXPERT_COUNT.format(arch="qwen3moe"),))
    with pytest.raises(GGUFError, match="holds experts but qwen3moe.expert_count is missing"):
        read_spec(dst)


# ---- mixrun inspect -------------------------------------------------------------------------------------------------

def test_inspect_shows_experts_and_active_parameters(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from mixrun.cli import main

    path = gguf_factory.write_model(tmp_path / "Qwen3-30B-A3B-Q4_K_M.gguf", "qwen3moe", qtype="Q4_K_M", sparse=True,
                                    **gguf_factory.QWEN3_30B_A3B)
    monkeypatch.setenv("COLUMNS", "160")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "128 routed, 8 used per token" in out and "on 48 of 48 layers" in out
    assert "3.353 B of 30.532 B per token" in out
    assert "94.6% of the weights" in out
    assert main(["inspect", str(path), "--json", "--no-tensors"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["n_active_params"] == 3353032704 and js["n_params"] == 30532122624
    assert js["moe"]["n_expert"] == 128 and js["moe"]["n_expert_used"] == 8 and js["moe"]["n_expert_shared"] == 0
    assert js["moe"]["expert_share"] == 0.9462 and len(js["moe"]["layer_expert_bytes"]) == 48
    assert js["moe"]["expert_bytes"] + js["moe"]["dense_bytes"] == js["weights_bytes"]


def test_mla_without_q_lora_and_distinct_head_widths(tmp_path: Path) -> None:
    """DeepSeek-V2-Lite's layout: no low-rank query (a plain attn_q), and a latent (kv_lora_rank) wider than a head's
    value (value_length_mla) and key (key_length_mla) widths, so no two of the MLA widths coincide as they do in
    TINY_MOE. The reader checks attn_q and attn_output against the heads' own widths, and llama.cpp's weights, KV
    cache and compute buffer are what mixrun says."""
    from mixrun.planner.memory import compute_bytes

    moe = MoEShape(n_expert=4, n_expert_used=2, n_ff_exp=32, n_expert_shared=1, n_dense_lead=1, kv_lora_rank=48,
                   rope_dim=16, v_head_dim=20)
    path = gguf_factory.write_moe_model(tmp_path / "lite.gguf", "deepseek2", head_dim=40, moe=moe)
    spec = read_spec(path)
    assert spec.kv_lora_rank == 48 and spec.kv_layers[0].k_dim == 48 + 16 and spec.kv_layers[0].v_dim == 0
    assert any(t.name == "blk.1.attn_q.weight" and t.shape == (4 * 40, 64) for t in spec.tensors)
    res = llamacpp_memory.llamacpp_buffers(str(path), 512, n_batch=128, n_ubatch=128, swa_full=False,
                                           extra_buffers=False, timeout=120)
    assert res["model_size"] == spec.total_bytes
    assert abs(res["kv"] - 512 * spec.kv_bytes_per_token("f16")) <= llamacpp_memory.LOG_PRECISION_BYTES
    for fa in (False, True):
        theirs = llamacpp_memory.llamacpp_buffers(str(path), 512, n_batch=128, n_ubatch=128, swa_full=False,
                                                  extra_buffers=False, flash_attn=fa, no_alloc=True,
                                                  timeout=120)["compute"]
        ours = compute_bytes(spec, ctx=512, ubatch=128, n_layers=spec.n_layers, last=True, flash_attn=fa)
        assert abs(ours / theirs - 1) <= 0.03, (fa, ours, theirs)
