"""Mixtures of experts planned for llama.cpp: dense part and KV on the GPUs, each layer's routed experts on its GPU or
in host RAM (planner/moe.py), on sparse full-size shapes; the placement against an exhaustive search and against
llama.cpp's --n-cpu-moe; the -ot regexes; and a tiny MoE model run end to end on the CPU."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gguf_factory
from gguf_factory import MoEShape
from mixrun.cli import main
from mixrun.model.gguf import read_spec
from mixrun.model.spec import ModelSpec
from mixrun.planner import PlanRequest, plan
from mixrun.planner.evaluate import Context
from mixrun.planner.memory import ModelFacts
from mixrun.planner.moe import (
    evaluate_moe,
    experts_override,
    int_range_regex,
    n_cpu_moe_layers,
    place_experts,
)
from mixrun.planner.types import Candidate
from mixrun.rig.profile import RigProfile, dump_profile, load_profile, parse_profile

GIB = 1 << 30


def _rig(name: str, gpus: list[tuple[str, float, float, float]], ram_gib: float, ram_gbs: float,
         cores: int = 16) -> RigProfile:
    """A one-host rig: (name, vram GiB, GB/s, fp16 TFLOP/s) per GPU, and host RAM as the CPU device."""
    devices = [{"id": f"gpu{i}", "host": "h", "backend": "cuda", "name": n, "vram_gib": v, "mem_bandwidth_gbs": bw,
                "fp16_tflops": tf} for i, (n, v, bw, tf) in enumerate(gpus)]
    devices.append({"id": "cpu", "host": "h", "backend": "cpu", "name": "Host CPU", "vram_gib": ram_gib,
                    "reserved_gib": 4.0, "mem_bandwidth_gbs": ram_gbs, "fp16_tflops": 1.0})
    return parse_profile({"format": "mixrun-profile/1", "name": name, "source": "user",
                          "hosts": [{"id": "h", "ram_gib": ram_gib, "cpu_cores": cores, "pcie_gbs": 25.0}],
                          "devices": devices}, name)


RTX3090 = ("NVIDIA GeForce RTX 3090", 24.0, 936.0, 71.0)
RTX3060 = ("NVIDIA GeForce RTX 3060", 12.0, 360.0, 25.6)


@pytest.fixture(scope="module")
def sparse(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelSpec]:
    d = tmp_path_factory.mktemp("moe-sparse")
    out = {
        "qwen3-30b": read_spec(gguf_factory.write_model(d / "Qwen3-30B-A3B-Q4_K_M.gguf", "qwen3moe", qtype="Q4_K_M",
                                                        sparse=True, **gguf_factory.QWEN3_30B_A3B)),
        "qwen3-235b": read_spec(gguf_factory.write_model(d / "Qwen3-235B-A22B-Q4_K_M.gguf", "qwen3moe",
                                                         qtype="Q4_K_M", sparse=True,
                                                         **gguf_factory.QWEN3_235B_A22B)),
        "gpt-oss-120b": read_spec(gguf_factory.write_model(d / "gpt-oss-120b.gguf", "gpt-oss", qtype="BF16",
                                                           sparse=True, **gguf_factory.GPT_OSS_120B)),
        # a small MoE whose placements can all be tried: 10 layers of ~1.4 GB of Q4_K/Q6_K experts
        "small": read_spec(gguf_factory.write_model(
            d / "small-moe.gguf", "qwen3moe", qtype="Q4_K_M", sparse=True, n_layers=10, n_embd=4096, n_head=32,
            n_head_kv=4, head_dim=128, n_ff=12288, n_vocab=32000, tied=False,
            moe=MoEShape(n_expert=128, n_expert_used=8, n_ff_exp=1536))),
    }
    return out


def _ctx(profile: RigProfile, spec: ModelSpec, req: PlanRequest | None = None) -> Context:
    req = req or PlanRequest()
    return Context(profile=profile, spec=spec, req=req, facts=ModelFacts(spec, req.kv_type))


def _moe(c: Candidate | None) -> Candidate:
    assert c is not None and c.label.startswith("llama.cpp MoE"), c and c.label
    return c


def _cpu_layers(c: Candidate, spec: ModelSpec) -> set[int]:
    """Layers whose routed experts the candidate's overrides send to the CPU, read back from its regexes."""
    pats = [re.compile(o.partition("=")[0]) for o in c.llama_kwargs.get("override_tensor", [])]
    hit = {t.name for t in spec.tensors if any(p.search(t.name) for p in pats)}
    assert all(t.routed_expert for t in spec.tensors if t.name in hit)  # experts only, never a dense weight
    return {t.layer for t in spec.tensors if t.name in hit}


# ---- the -ot regexes ---------------------------------------------------------------------------------------------


def test_int_range_regex_is_exact() -> None:
    for lo, hi in itertools.combinations_with_replacement(range(0, 125, 3), 2):
        rx = re.compile("^(" + "|".join(int_range_regex(lo, hi)) + ")$")
        assert {n for n in range(0, 200) if rx.match(str(n))} == set(range(lo, hi + 1)), (lo, hi)


def test_experts_override_matches_llamacpp_names(sparse: dict[str, ModelSpec]) -> None:
    spec = sparse["gpt-oss-120b"]  # weights and biases of the experts, gpt-oss names
    layers = {0, 1, 2, 9, 10, 11, 12, 19, 35}
    ot = experts_override(layers)
    assert ot is not None and ot.endswith("=CPU") and "," not in ot
    assert ot.startswith(r"blk\.(") and r"\.ffn_(up|down|gate|gate_up)_(ch|)exps" in ot
    rx = re.compile(ot.partition("=")[0])
    hit = [t for t in spec.tensors if rx.search(t.name)]
    assert {t.layer for t in hit} == layers and all(t.routed_expert for t in hit)
    assert {t.name for t in hit} == {t.name for t in spec.tensors if t.routed_expert and t.layer in layers}
    assert experts_override([]) is None
    assert experts_override(range(10, 24)) == r"blk\.(1[0-9]|2[0-3])\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU"


# ---- whole plans on full-size shapes -------------------------------------------------------------------------------


def test_qwen3_235b_on_two_3090s_and_128gib(sparse: dict[str, ModelSpec]) -> None:
    spec = sparse["qwen3-235b"]
    assert 130 * GIB < spec.total_bytes < 136 * GIB  # Qwen3-235B-A22B Q4_K_M is 133 GiB (142 GB)
    rig = _rig("2x3090-128g", [RTX3090, RTX3090], ram_gib=128.0, ram_gbs=51.2)
    rep = plan(rig, spec, PlanRequest(ctx=8192))
    c = _moe(rep.best)
    assert c.fits and c.backend.value == "llama.cpp"
    on_cpu = _cpu_layers(c, spec)
    assert 40 < len(on_cpu) < spec.n_layers  # most experts in RAM, some kept on each GPU
    for g in c.groups:  # every GPU keeps some of its layers' experts
        assert set(range(*g.layers)) - on_cpu, g
    uses = {u.id: u for u in c.devices}
    assert uses["cpu"].weights_bytes > 80 * GIB and all(u.fits for u in c.devices)
    cmd = c.commands["llama_server"]
    assert "-ot 'blk" in cmd and "=CPU'" in cmd and "-sm layer -ts " in cmd
    assert 2.0 < c.decode_tok_s < 10.0  # DDR4 dual channel streams ~1.4 GB of experts per token
    assert "--n-cpu-moe" in c.why and "op_offload" in c.why


def test_qwen3_30b_fits_wholly_on_dual_3090_plus_3060(sparse: dict[str, ModelSpec]) -> None:
    rep = plan(load_profile("dual-3090-nvlink-plus-3060"), sparse["qwen3-30b"], PlanRequest(ctx=8192))
    c = rep.best  # the MoE builder's all-on-GPU plan or the equal one-GPU plan: no expert in RAM either way
    assert c is not None and c.backend.value == "llama.cpp"
    assert c.fits and "override_tensor" not in c.llama_kwargs and "-ot" not in c.commands["llama_server"]
    assert all(u.id != "cpu" or u.weights_bytes < GIB for u in c.devices)  # the host holds the embedding only
    assert c.decode_tok_s > 100


def test_12gb_gpu_split_is_the_cost_models_best(sparse: dict[str, ModelSpec]) -> None:
    """One 12 GB GPU and 64 GiB RAM: the experts the planner leaves in RAM are the cheapest fitting set of an
    exhaustive search over every per-layer placement."""
    spec = sparse["small"]
    rig = _rig("3060-64g", [RTX3060], ram_gib=64.0, ram_gbs=89.6, cores=8)
    ctx = _ctx(rig, spec)
    c = _moe(plan(rig, spec, PlanRequest()).best)
    chosen = _cpu_layers(c, spec)
    gpus, counts = list(ctx.gpus), (spec.n_layers,)
    best = None
    for k in range(spec.n_layers + 1):
        for subset in itertools.combinations(range(spec.n_layers), k):
            ev = evaluate_moe(ctx, gpus, counts, subset)
            if ev.fits and (best is None or ev.decode.total_s < best[0]):
                best = (ev.decode.total_s, set(subset))
    assert best is not None and 0 < len(best[1]) < spec.n_layers  # a real split, not all or nothing
    mine = evaluate_moe(ctx, gpus, counts, chosen)
    assert mine.fits and mine.decode.total_s == pytest.approx(best[0], rel=1e-9)
    assert c.decode_tok_s == pytest.approx(1 / best[0], rel=1e-9)


@pytest.mark.parametrize("rig_name", ["dual-3090-nvlink", "2x-5060ti-pcie", "3090-plus-4090-pcie",
                                      "dual-3090-nvlink-plus-3060"])
def test_never_slower_than_n_cpu_moe(sparse: dict[str, ModelSpec], rig_name: str) -> None:
    """At equal memory (every GPU and the host within capacity), mixrun's placement decodes at least as fast as
    --n-cpu-moe N with the same -ts, and, on two GPUs, as --n-cpu-moe with any -ts."""
    spec = sparse["gpt-oss-120b"]
    rig = load_profile(rig_name)
    ctx = _ctx(rig, spec)
    c = _moe(plan(rig, spec, PlanRequest()).best)
    assert c.fits
    mine = 1 / c.decode_tok_s
    gpus = [rig.device(g.devices[0]) for g in c.groups]
    counts = [g.n_layers for g in c.groups]
    ts_options = [counts]
    if len(gpus) == 2:
        ts_options = [[a, spec.n_layers - a] for a in range(1, spec.n_layers)]
    for cs in ts_options:
        n = n_cpu_moe_layers(ctx, gpus, cs)
        if n is None:
            continue
        ev = evaluate_moe(ctx, gpus, cs, [i for i in range(n) if spec.layer_expert_bytes[i]])
        if ev.fits:
            assert mine <= ev.decode.total_s * (1 + 1e-9), (cs, n)
    # and the per-GPU choice is what place_experts gives for the candidate's own -ts
    assert place_experts(ctx, gpus, counts) == frozenset(_cpu_layers(c, spec))


def test_plan_json_carries_override_tensor(sparse: dict[str, ModelSpec], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    rig = _rig("2x3090-128g", [RTX3090, RTX3090], ram_gib=128.0, ram_gbs=51.2)
    prof = tmp_path / "rig.toml"
    prof.write_text(dump_profile(rig))
    assert main(["plan", sparse["qwen3-235b"].source, "--profile", str(prof), "--json", "--ctx", "8192"]) == 0
    out = json.loads(capsys.readouterr().out)
    best = out["candidates"][out["chosen"]]
    ot = best["llama_cpp_kwargs"]["override_tensor"]
    assert ot and all(o.endswith("=CPU") for o in ot)
    assert all(f"-ot '{o}'" in best["commands"]["llama_server"] for o in ot)


def test_suggests_more_ram_for_experts(sparse: dict[str, ModelSpec]) -> None:
    """Qwen3-235B on two 3090s with 64 GiB of RAM does not fit: the suggestions say how much RAM the experts need."""
    rig = _rig("2x3090-64g", [RTX3090, RTX3090], ram_gib=64.0, ram_gbs=51.2)
    rep = plan(rig, sparse["qwen3-235b"], PlanRequest(ctx=4096))
    assert rep.best is None or not rep.best.fits
    assert any("experts" in s.what and "RAM" in s.what for s in rep.suggestions), rep.suggestions


# ---- end to end on the CPU ----------------------------------------------------------------------------------------


def test_tiny_moe_plans_and_chats_on_cpu_only(tmp_path: Path) -> None:
    model = gguf_factory.speaking_hi(gguf_factory.write_moe_model(tmp_path / "tiny-qwen3moe.gguf", "qwen3moe"))
    rep = plan(load_profile("cpu-only"), read_spec(model), PlanRequest(ctx=512))
    assert rep.best is not None and rep.best.fits and rep.best.backend.value == "llama.cpp"
    assert not rep.best.llama_kwargs.get("override_tensor")
    r = subprocess.run([sys.executable, "-m", "mixrun.cli", "chat", str(model), "--profile", "cpu-only",
                        "--backend", "llama.cpp", "--prompt", "hi", "--max-tokens", "4", "--ctx", "512"],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
