"""Whole plans on bundled rigs: the hybrid for the matched NVLink pair plus an odd card, shortfalls and
suggestions when nothing fits, forced splits, measured results, and the JSON contract."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import gguf_factory
from mixrun.cli import main
from mixrun.model.gguf import read_spec
from mixrun.model.spec import ModelSpec
from mixrun.planner import PlanError, PlanRequest, cost, plan, scaled_spec, spec_at_bpw
from mixrun.planner.types import Candidate, Group, Split
from mixrun.rig.profile import Result, load_profile


def _assert_hybrid_shape(c: Candidate) -> None:
    assert c.split == Split.HYBRID and c.backend.value == "torch" and c.fits
    tp = [g for g in c.groups if g.tp == 2]
    assert len(tp) == 1 and set(tp[0].devices) == {"gpu0", "gpu1"}
    assert tp[0].kv_heads == (4, 4) and tp[0].shares == (0.5, 0.5)  # 8 whole KV heads; the shares follow them
    rest = [g for g in c.groups if g.tp == 1]
    assert [g.devices for g in rest] == [("gpu2",)]
    assert [g.kv_heads for g in rest] == [()]
    assert sum(g.n_layers for g in c.groups) == 80
    assert sorted(g.layers for g in c.groups)[0][0] == 0  # contiguous, half-open, covering every layer


def test_hybrid_on_nvlink_pair_plus_3060(llama70b: ModelSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch plan: TP 2 on the matched NVLink pair and a layer stage on the 3060. Quantized matrices go through
    the torch backend's fused Triton kernels, which the planner assumes stream blocks at 60% of the dense rate until
    they are measured on a GPU: at that rate llama.cpp's tensor split over the pair is faster for a Q4_K_M model,
    and the planner picks it and says why."""
    assert 42.0e9 < llama70b.total_bytes < 43.0e9  # Llama-3-70B Q4_K_M is 42.5 GB
    prof = load_profile("dual-3090-nvlink-plus-3060")
    rep = plan(prof, llama70b, PlanRequest(ctx=4096))
    hybrid = next(c for c in rep.candidates if c.backend.value == "torch")
    _assert_hybrid_shape(hybrid)
    assert "fused Triton kernels, assumed at 60% of the dense rate" in hybrid.why
    best = rep.best
    assert best is not None and best.fits and best.backend.value == "llama.cpp"
    assert best.decode_tok_s > 1.2 * hybrid.decode_tok_s
    labels = {c.split.value for c in rep.candidates if c.backend.value == "llama.cpp"}
    assert {"layer", "row", "tensor"} <= labels
    for c in rep.candidates:
        assert c.decode_tok_s > 0 and c.prefill_tok_s > 0 and c.why

    # the 3060 adds next to nothing to llama.cpp's tensor split here: every all-reduce then crosses its PCIe x4
    # slot. Since llama.cpp's all-reduce is costed at 2 + (n-2)/2 hops (issue 17) rather than a ring's 2(n-1), the
    # three-card split comes out within 1% of the pair's; the planner cannot choose between them (the subset search
    # keeps one tensor candidate), so either is right as long as it is the faster
    pair = plan(load_profile("dual-3090-nvlink"), llama70b, PlanRequest(ctx=4096)).best
    assert pair is not None and best.decode_tok_s >= pair.decode_tok_s
    if best.groups == pair.groups:
        assert best.llama_kwargs["devices"] == ["CUDA0", "CUDA1"]
        assert "--device CUDA0,CUDA1" in best.commands["llama_server"]
        assert "gpu2 left out: the best plan using it" in best.why  # what the odd card would cost, in one clause
    else:
        assert best.split == pair.split and best.decode_tok_s < 1.02 * pair.decode_tok_s

    monkeypatch.setattr(cost, "QUANT_KERNEL_EFF", 1.0)
    rep = plan(prof, llama70b, PlanRequest(ctx=4096))
    _assert_hybrid_shape(next(c for c in rep.candidates if c.backend.value == "torch"))
    # the fastest, or one over fewer devices within the planner's margin of it
    fastest = max(c.decode_tok_s for c in rep.candidates if c.fits)
    assert rep.best is not None and rep.best.decode_tok_s * 1.1 >= fastest


def test_too_big_reports_shortfalls_and_checked_suggestions(llama70b: ModelSpec) -> None:
    prof = load_profile("2x-5060ti-pcie")
    req = PlanRequest(ctx=8192)
    rep = plan(prof, llama70b, req)
    assert rep.chosen is None and not any(c.fits for c in rep.candidates)
    for c in rep.candidates:
        assert any(d.shortfall_bytes > 0 for d in c.devices)
        assert all(d.shortfall_bytes == max(0, d.total_bytes - d.capacity_bytes) for d in c.devices)
    assert rep.suggestions
    kinds = {k for s in rep.suggestions for k in s.change}
    assert {"cpu_offload", "bits_per_weight"} <= kinds
    for s in rep.suggestions:  # every suggestion re-plans as fitting
        spec, r = llama70b, req
        for key, value in s.change.items():
            if key == "bits_per_weight":
                spec = spec_at_bpw(llama70b, value)
                assert abs(spec.bits_per_weight - value) < 1e-6
            else:
                r = dataclasses.replace(r, **{key: value})
        again = plan(prof, spec, r, suggest=False)
        assert again.best is not None and again.best.fits, s.what


def test_context_and_kv_suggestions(llama70b: ModelSpec) -> None:
    """A rig where the weights fit but a long context does not: a shorter context and a smaller KV cache fit."""
    prof = load_profile("dual-3090-nvlink-plus-3060")
    req = PlanRequest(ctx=131072)
    rep = plan(prof, llama70b, req)
    assert rep.chosen is None
    by_key = {k: s for s in rep.suggestions for k in s.change}
    assert "ctx" in by_key and by_key["ctx"].change["ctx"] < 131072
    again = plan(prof, llama70b, dataclasses.replace(req, ctx=by_key["ctx"].change["ctx"]), suggest=False)
    assert again.best is not None and again.best.fits
    over = plan(prof, llama70b, dataclasses.replace(req, ctx=by_key["ctx"].change["ctx"] + 256), suggest=False)
    assert over.best is None  # the largest context, not just one that fits


def test_forced_split_is_chosen(llama70b: ModelSpec) -> None:
    prof = load_profile("dual-3090-nvlink-plus-3060")
    for split in ("layer", "row", "tensor"):
        rep = plan(prof, llama70b, PlanRequest(split=split, backend="llama.cpp"))
        assert rep.best is not None and rep.best.split.value == split and rep.best.backend.value == "llama.cpp"


def test_measured_results_win(llama70b: ModelSpec) -> None:
    prof = load_profile("dual-3090-nvlink-plus-3060")
    name = "Llama-3-70B-Q4_K_M.gguf"
    prof = prof.model_copy(update={"results": (Result(model=name, split="row", backend="llama.cpp",
                                                      decode_tok_s=99.0),)})
    rep = plan(prof, llama70b)
    assert rep.best is not None and rep.best.split == Split.ROW and rep.best.measured
    assert rep.best.decode_tok_s == 99.0 and "measured" in rep.best.why


def test_a_backend_measured_on_another_model_scales_its_predictions(smollm2: str) -> None:
    """`mixrun bench --record` stores what was predicted beside what was measured; on the same rig, the same layout
    of another model is then predicted at that ratio (the torch backend's CPU products run 2.5x slower on an Intel
    Xeon than the constants assume, for one). The other backend, and the measured model itself, keep theirs."""
    spec = read_spec(smollm2)
    prof = load_profile("cpu-only")
    before = {c.label: c for c in plan(prof, spec).candidates}
    torch_label = next(lbl for lbl, c in before.items() if c.backend == "torch")
    intel = Result(model="other.gguf", split="none", backend="torch", label=torch_label, decode_tok_s=14.8,
                   predicted_decode_tok_s=43.5, prefill_tok_s=200.0, predicted_prefill_tok_s=400.0,
                   date="2026-12-03T10:00:00Z")
    after = {c.label: c for c in plan(prof.model_copy(update={"results": (intel,)}), spec).candidates}
    t0, t1 = before[torch_label], after[torch_label]
    assert t1.decode_tok_s == pytest.approx(t0.decode_tok_s * 14.8 / 43.5) and not t1.measured
    assert t1.prefill_tok_s == pytest.approx(t0.prefill_tok_s * 0.5)
    assert t1.model_decode_tok_s == t0.decode_tok_s and "x0.34 as measured on other.gguf (2026-12-03)" in t1.why
    assert t1.to_json()["predicted_decode_tok_s"] == round(t0.decode_tok_s, 2)
    llama = next(lbl for lbl, c in before.items() if c.backend == "llama.cpp")
    assert after[llama].decode_tok_s == before[llama].decode_tok_s
    # a result without the prediction (older mixrun) scales nothing; within 5% is noise
    for r in (intel.model_copy(update={"predicted_decode_tok_s": None, "predicted_prefill_tok_s": None}),
              intel.model_copy(update={"decode_tok_s": 42.0, "prefill_tok_s": 390.0})):
        same = {c.label: c for c in plan(prof.model_copy(update={"results": (r,)}), spec).candidates}
        assert same[torch_label].decode_tok_s == t0.decode_tok_s
    # bench --record writes the prediction, the cost model's own even where a recorded figure replaced it
    from mixrun.bench.record import _result
    from mixrun.bench.results import BenchConfig, BenchReport, Measured, Run

    m = Measured(candidate=t1, runs=[Run(32, 32, 8, 0.1, 0.5, "length")])
    rep = BenchReport(model=smollm2, model_bytes=spec.file_bytes, profile="cpu-only", config=BenchConfig(),
                      results=[m])
    rec = _result(m, rep, t1, "2026-12-03")
    assert rec.predicted_decode_tok_s == round(t0.decode_tok_s, 2) and rec.decode_tok_s == m.decode.median


def test_fewer_devices_can_be_faster(small_spec: ModelSpec) -> None:
    """A model that fits one card: a layer split gains nothing, so the optimized -ts uses the faster card alone,
    while llama.cpp's default split also drags in the slower one."""
    rep = plan(load_profile("3090-plus-4090-pcie"), small_spec)
    by_label = {c.label: c for c in rep.candidates}
    opt = by_label["llama.cpp layer, optimized -ts"]
    assert [g.devices for g in opt.groups] == [("gpu1",)]  # the 4090: more bandwidth
    default = by_label["llama.cpp layer, default split (by free memory)"]
    assert len(default.groups) == 2 and default.decode_tok_s < opt.decode_tok_s
    single = plan(load_profile("3090-plus-4090-pcie"), small_spec, PlanRequest(split="none")).best
    assert single is not None and single.groups[0].devices == ("gpu1",)
    assert "-sm none -mg 1" in single.commands["llama_server"]


def test_cpu_only_rig_and_two_hosts(small_spec: ModelSpec, llama70b: ModelSpec) -> None:
    rep = plan(load_profile("cpu-only"), small_spec)
    assert rep.best is not None and rep.best.groups[0].devices == ("cpu",)
    big = scaled_spec(llama70b, 1.4)  # ~60 GB: more than one host's two 3090s hold
    two = plan(load_profile("two-hosts-2x3090-10gbe"), big)
    assert two.notes and "first host" in two.notes[0]
    torch = next(c for c in two.candidates if c.backend.value == "torch")
    assert torch.fits and all(len({two_host(d) for d in g.devices}) == 1 for g in torch.groups)  # TP never spans hosts
    assert any(g.tp == 2 for g in torch.groups)  # TP 2 over PCIe inside a host, a pipeline across the network
    hosts = {two_host(d) for g in torch.groups for d in g.devices}
    assert hosts == {"a", "b"}
    assert torch.decode.handoff_s > 2 * 100e-6  # at least two crossings of the 10 GbE network per token


def two_host(device_id: str) -> str:
    return device_id.split(".")[0]


def test_not_plannable_and_bad_request(tmp_path, llama70b: ModelSpec) -> None:
    import gguf_factory
    from mixrun.model.gguf import read_spec

    mamba = read_spec(gguf_factory.write_model(tmp_path / "m.gguf", "mamba"))
    with pytest.raises(PlanError, match="not plannable yet"):
        plan(load_profile("cpu-only"), mamba)
    with pytest.raises(PlanError, match="--ctx 1"):
        plan(load_profile("cpu-only"), llama70b, PlanRequest(ctx=1))


def test_cli_plan_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--profile", "dual-3090-nvlink", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert set(d) >= {"model", "profile", "request", "chosen", "candidates"}
    assert set(d["model"]) >= {"path", "arch", "n_layers", "weights_bytes", "kv_bytes_per_token"}
    assert d["request"] == {"ctx": 4096, "batch": 1, "kv_type": "f16", "split": "auto", "backend": "auto"}
    c = d["candidates"][d["chosen"]]
    assert set(c) >= {"split", "backend", "fits", "decode_tok_s", "prefill_tok_s", "groups", "devices", "why",
                      "commands"}
    for g in c["groups"]:
        assert set(g) >= {"devices", "tp", "layers"} and g["layers"][0] < g["layers"][1]
    for dev in c["devices"]:
        assert set(dev) >= {"id", "weights_bytes", "kv_bytes", "compute_bytes", "total_bytes", "capacity_bytes"}
        assert all(isinstance(dev[k], int) for k in ("weights_bytes", "kv_bytes", "total_bytes"))
    assert main(["plan", "--profile", "dual-3090-nvlink", "--split", "row"]) == 0
    out = capsys.readouterr().out
    assert "llama-server" in out and "-sm row" in out
    # an older llama.cpp build is part of the request, and predicts a slower decode (no CUDA graphs then)
    assert main(["plan", "--profile", "dual-3090-nvlink", "--json", "--llamacpp-build", "2000"]) == 0
    old = json.loads(capsys.readouterr().out)
    assert old["request"]["llamacpp_build"] == 2000
    assert old["candidates"][old["chosen"]]["decode_tok_s"] < c["decode_tok_s"]
    assert main(["plan", "--profile", "dual-3090-nvlink", "--llamacpp-build", "2000"]) == 0
    assert "llama.cpp b2000" in capsys.readouterr().out  # the human report says which build it predicts for


def test_tp_groups_carry_whole_kv_heads(smollm2: str, llama70b: ModelSpec) -> None:
    """A TP group carries the KV heads the planner allocated as ints summing to the model's ``n_head_kv``; its
    shares are those heads over all heads, and the plan JSON carries both (``shares`` rounded, for old readers)."""
    spec = read_spec(smollm2)  # 3 KV heads: a TP pair takes 2 + 1
    prof = load_profile("dual-3090-nvlink-plus-3060")
    for split in (Split.HYBRID, Split.TENSOR):
        c = plan(prof, spec, PlanRequest(backend="torch", split=split)).best
        assert c is not None and c.split == split and c.fits
        (tp,) = [g for g in c.groups if g.tp > 1]
        assert tp.kv_heads == (2, 1) and all(type(k) is int for k in tp.kv_heads)
        assert sum(tp.kv_heads) == spec.n_head_kv and tp.shares == (2 / 3, 1 / 3)
        assert tp.to_json() == {"devices": ["gpu0", "gpu1"], "tp": 2, "layers": list(tp.layers),
                                "shares": [0.6667, 0.3333], "kv_heads": [2, 1]}
        assert all(g.kv_heads == () and "kv_heads" not in g.to_json() for g in c.groups if g.tp == 1)
    rep = plan(prof, llama70b, PlanRequest(ctx=4096))
    tensor = next(c for c in rep.candidates if c.split == Split.TENSOR and c.backend.value == "llama.cpp")
    (g,) = tensor.groups  # llama.cpp rounds -ts per tensor itself: the group carries the -ts shares, not heads
    ts = tensor.llama_kwargs["tensor_split"]
    assert g.kv_heads == () and g.shares == pytest.approx([t / sum(ts) for t in ts])
    assert f"-ts {','.join(f'{t:g}' for t in ts)} " in tensor.commands["llama_server"]
    row = next(c for c in rep.candidates if c.split == Split.ROW)  # split by memory, KV cache on the main GPU
    assert row.groups[0].kv_heads == () and "kv_heads" not in row.groups[0].to_json()
    assert abs(sum(row.groups[0].shares) - 1.0) < 1e-12


def test_group_kv_heads_are_checked() -> None:
    g = Group(("a", "b"), (0, 4), kv_heads=(1, 7))
    assert g.shares == (0.125, 0.875) and dataclasses.replace(g, layers=(4, 8)).kv_heads == (1, 7)
    assert Group(("a",), (0, 4)).shares == (1.0,)
    with pytest.raises(ValueError, match="needs its KV heads"):
        Group(("a", "b"), (0, 4))
    for bad in ((2.0, 1.0), (3, 0), (3,)):
        with pytest.raises(ValueError, match="one whole number per device, each at least 1"):
            Group(("a", "b"), (0, 4), kv_heads=bad)
    with pytest.raises(ValueError, match="are not its KV heads'"):
        Group(("a", "b"), (0, 4), (0.5, 0.5), kv_heads=(2, 1))


def test_kv_suggestions_only_offer_smaller_caches(llama70b: ModelSpec) -> None:
    prof = load_profile("dual-3090-nvlink-plus-3060")
    rep = plan(prof, llama70b, PlanRequest(ctx=131072, kv_type="q8_0"))
    offered = [s.change["kv_type"] for s in rep.suggestions if "kv_type" in s.change]
    assert offered and set(offered) <= {"q4_0"}


def test_torch_on_a_cpu_counts_the_float32_copies_it_holds(smollm2: str) -> None:
    """CPU ranks dequantize once to float32: the torch candidate on a CPU-only rig holds (and streams) 4 bytes per
    weight, where llama.cpp holds the Q4_1 file's bytes."""
    from mixrun.model.gguf import read_spec

    spec = read_spec(smollm2)
    rep = plan(load_profile("cpu-only"), spec, PlanRequest(ctx=4096))
    torch_c = next(c for c in rep.candidates if c.backend.value == "torch")
    llama_c = next(c for c in rep.candidates if c.backend.value == "llama.cpp")
    assert torch_c.devices[0].weights_bytes == sum(4 * t.n_elements for t in spec.tensors)
    assert llama_c.devices[0].weights_bytes == spec.total_bytes
    assert "Triton" not in torch_c.why
    # the same per-byte and per-layer costs (docs/cost-model.md), 5.5 times the bytes
    assert torch_c.decode_tok_s < 0.6 * llama_c.decode_tok_s


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"])
def test_backends_are_offered_only_for_architectures_they_run(arch: str, tmp_path: Path) -> None:
    """gemma2/phi3 files used to get torch candidates the engine refused at start."""
    from mixrun.vocab import BACKEND_ARCHS, Backend

    kw = {"sliding_window": 16} if arch.startswith("gemma") else {}
    spec = read_spec(gguf_factory.write_model(tmp_path / f"{arch}.gguf", arch, n_layers=4, n_embd=256, n_head=4,
                                              n_head_kv=2, n_ff=512, n_vocab=512, sparse=True, **kw))
    rep = plan(load_profile("dual-3090-nvlink-plus-3060"), spec)
    offered = {c.backend for c in rep.candidates}
    assert offered == {b for b in Backend if arch in BACKEND_ARCHS[b]}
    assert (Backend.TORCH in offered) == (arch in ("llama", "qwen2", "qwen3"))


def test_even_shares_are_not_reported_as_light(llama70b: ModelSpec) -> None:
    """Eight H100s at 1/8 of the weights each are not "lightly used": the why names no GPU to drop, and plan()
    re-plans nothing for it. A 3060 at 14% beside two 3090s is (test_tensor_split.py)."""
    best = plan(load_profile("8x-h100-sxm"), llama70b, PlanRequest(ctx=4096)).best
    assert best is not None and best.fits and len({d for g in best.groups for d in g.devices}) == 8
    assert "without gpu" not in best.why and "holds" not in best.why
