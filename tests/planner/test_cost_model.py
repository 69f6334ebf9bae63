"""The cost model's issue-17 behaviour on hand-built rigs: one card beating two, a small model's tensor split,
backend classes, the prefill terms per ubatch, and the correction a rig's recorded runs teach."""

from __future__ import annotations

from pathlib import Path

import pytest

import gguf_factory
from mixrun.model.gguf import read_spec
from mixrun.model.spec import ModelSpec
from mixrun.planner import PlanRequest, build_candidates, cost, plan
from mixrun.planner.types import Split
from mixrun.rig.profile import FORMAT, Device, Host, Result, RigProfile

LLAMA32_1B = dict(n_layers=16, n_embd=2048, n_head=32, n_head_kv=8, head_dim=64, n_ff=8192, n_vocab=128256)
LLAMA32_3B = dict(n_layers=28, n_embd=3072, n_head=24, n_head_kv=8, head_dim=128, n_ff=8192, n_vocab=128256)


def _spec(tmp: Path, name: str, shape: dict, qtype: str = "F16") -> ModelSpec:
    return read_spec(gguf_factory.write_model(tmp / f"{name}.gguf", "llama", qtype=qtype, sparse=True, tied=True,
                                              **shape))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelSpec]:
    tmp = tmp_path_factory.mktemp("cost")
    return {"1b": _spec(tmp, "llama32-1b", LLAMA32_1B), "3b": _spec(tmp, "llama32-3b", LLAMA32_3B)}


def _gpu(i: int, name: str, backend: str, vram: float, bw: float, tflops: float) -> Device:
    return Device(id=f"gpu{i}", backend=backend, name=name, vram_gib=vram, mem_bandwidth_gbs=bw, fp16_tflops=tflops)


def _rig(*gpus: Device, results: tuple[Result, ...] = ()) -> RigProfile:
    cpu = Device(id="cpu", backend="cpu", name="host CPU", vram_gib=64.0, mem_bandwidth_gbs=50.0, fp16_tflops=1.0)
    return RigProfile(format=FORMAT, name="t", hosts=(Host(id="h"),), devices=(*gpus, cpu), results=results)


def _rx6800_rx6700xt() -> RigProfile:
    """Issue 17's rig: an RX 6800 (16 GB, 512 GB/s) and an RX 6700 XT (12 GB, 384 GB/s) under ROCm."""
    return _rig(_gpu(0, "AMD Radeon RX 6800", "rocm", 16.0, 512.0, 32.3),
                _gpu(1, "AMD Radeon RX 6700 XT", "rocm", 12.0, 384.0, 26.4))


def test_one_card_beats_two_rx6800(models: dict[str, ModelSpec]) -> None:
    """Llama-3.2-3B F16 fits on the RX 6800 alone (measured 57 tok/s there, 25 for layer over both): auto chooses
    the 6800 alone and says that splitting loses; a forced split is still honoured."""
    rep = plan(_rx6800_rx6700xt(), models["3b"], PlanRequest(ctx=4096))
    best = rep.best
    assert best is not None and best.fits and best.split == Split.NONE
    assert {d for g in best.groups for d in g.devices} == {"gpu0"}
    assert "one card beats splitting" in best.why
    assert 35 < best.decode_tok_s < 80  # measured 57
    forced = plan(_rx6800_rx6700xt(), models["3b"], PlanRequest(ctx=4096, split=Split.LAYER)).best
    assert forced is not None and forced.split == Split.LAYER


def test_split_chosen_only_past_the_margin(models: dict[str, ModelSpec]) -> None:
    """A split that the model predicts faster than one card by less than SPLIT_MARGIN is not chosen; one that is
    faster by more is (a 3B F16 that does not fit one 8 GB card, say)."""
    rig = _rig(_gpu(0, "NVIDIA GeForce RTX 4090", "cuda", 24.0, 1008.0, 165.2),
               _gpu(1, "NVIDIA GeForce RTX 4090", "cuda", 24.0, 1008.0, 165.2))
    rep = plan(rig, models["3b"], PlanRequest(ctx=4096))
    fitting = [c for c in rep.candidates if c.fits]
    single = max((c for c in fitting if len({d for g in c.groups for d in g.devices}) == 1),
                 key=lambda c: c.decode_tok_s)
    split = max((c for c in fitting if len({d for g in c.groups for d in g.devices}) > 1),
                key=lambda c: c.decode_tok_s)
    best = rep.best
    assert best is not None
    if split.decode_tok_s >= single.decode_tok_s * (1 + plan.__globals__["SPLIT_MARGIN"]):
        assert best is split
    else:
        assert best.split == Split.NONE and "one card beats splitting" in best.why
    small = _rig(_gpu(0, "NVIDIA GeForce RTX 3060 Ti", "cuda", 8.0, 448.0, 32.4),
                 _gpu(1, "NVIDIA GeForce RTX 3060 Ti", "cuda", 8.0, 448.0, 32.4))
    best = plan(small, models["3b"], PlanRequest(ctx=4096)).best
    assert best is not None and best.fits and best.split != Split.NONE  # 6.4 GB of F16 weights fit no one card


def test_small_model_tensor_beats_layer_on_four_4090s(models: dict[str, ModelSpec]) -> None:
    """Issue 17: Llama-3.2-1B F16 on four 4090s decodes 1.3x faster split by tensor than by layer."""
    rig = _rig(*(_gpu(i, "NVIDIA GeForce RTX 4090", "cuda", 24.0, 1008.0, 165.2) for i in range(4)))
    cands = build_candidates(rig, models["1b"], PlanRequest(ctx=4096))
    on_all = [c for c in cands if c.backend.value == "llama.cpp" and len({d for g in c.groups for d in g.devices}) == 4]
    tensor = max(c.decode_tok_s for c in on_all if c.split == Split.TENSOR)
    layer = max(c.decode_tok_s for c in on_all if c.split == Split.LAYER)
    assert 1.1 < tensor / layer < 1.7


def test_backend_classes() -> None:
    def cls(name: str, backend: str) -> str:
        return cost.device_class(_gpu(0, name, backend, 16.0, 500.0, 50.0))

    assert cls("AMD Radeon RX 7900 XTX", "rocm") == "rocm-matrix"
    assert cls("AMD Instinct MI100", "rocm") == "rocm-cdna"
    assert cls("AMD Radeon AI PRO R9700", "rocm") == "rocm-matrix"
    assert cls("AMD Instinct MI50/MI60", "rocm") == "rocm-gcn"
    assert cls("AMD Radeon RX 6800", "rocm") == "rocm"
    assert cls("Tesla P100-PCIE-16GB", "cuda") == "p100"
    assert cls("AMD Radeon RX 6800", "rocm") == "rocm"
    assert cls("AMD Radeon RX 6800", "vulkan") == "vulkan-amd"
    assert cls("Intel(R) Arc(TM) Pro B60 Graphics", "vulkan") == "vulkan-intel"
    assert cls("NVIDIA GeForce RTX 3090", "vulkan") == "gpu"  # Vulkan on NVIDIA measures like CUDA
    assert cls("Apple M2 Ultra", "metal") == "metal"
    # a backend without figures for a class takes its GeForce ones rather than failing
    assert cost.costs("torch", _gpu(0, "AMD Radeon RX 6800", "rocm", 16.0, 512.0, 32.3)) == cost.COSTS[("torch", "gpu")]
    rocm = cost.costs("llama.cpp", _gpu(0, "AMD Radeon RX 6800", "rocm", 16.0, 512.0, 32.3))
    assert rocm.bw_eff < cost.COSTS[("llama.cpp", "gpu")].bw_eff


def test_prefill_terms(models: dict[str, ModelSpec]) -> None:
    """Without flash attention the KQ scores cost memory traffic; a K-quant multiplies slower than F16."""
    rig = _rig(_gpu(0, "NVIDIA GeForce RTX 4090", "cuda", 24.0, 1008.0, 165.2))
    fa = plan(rig, models["1b"], PlanRequest(ctx=4096, prompt_tokens=2048)).best
    no_fa = plan(rig, models["1b"], PlanRequest(ctx=4096, prompt_tokens=2048, flash_attn=False)).best
    assert fa is not None and no_fa is not None and no_fa.prefill_tok_s < fa.prefill_tok_s
    assert no_fa.decode_tok_s == pytest.approx(fa.decode_tok_s)
    assert cost.QUANT_PREFILL["Q4_K"] < cost.QUANT_PREFILL["Q4_0"] == cost.QUANT_PREFILL["F16"]


def test_matmul_path_follows_llamacpp() -> None:
    """The kernel a 512-token ubatch takes, as ggml_cuda_should_use_mmq picks it: MMQ on int8 tensor cores from
    Turing on, dp4a MMQ on Pascal and gfx906/RDNA2, dequantize + BLAS on V100, Vega 10, CDNA1/2 for K-quants and
    Q8_0, RDNA3 for Q6_K, for F16, and on CUDA builds before PR #8075."""
    def path(name: str, qtype: str, backend: str = "cuda", build: int | None = None) -> str:
        return cost.matmul_path(_gpu(0, name, backend, 16.0, 500.0, 50.0), qtype, build)

    assert path("NVIDIA GeForce RTX 4090", "Q4_K") == "mma"
    assert path("NVIDIA GeForce RTX 4090", "F16") == "blas"
    assert path("NVIDIA GeForce RTX 4090", "Q4_K", build=3000) == "blas"
    assert path("NVIDIA GeForce RTX 4090", "Q4_K", build=cost.MMQ_DEFAULT_BUILD) == "mma"
    assert path("Tesla P40", "Q4_K", build=3000) == "dp4a"
    assert path("Tesla V100-PCIE-32GB", "Q4_0") == "blas"
    assert path("AMD Instinct MI50/MI60", "Q4_K", "rocm") == "dp4a"
    assert path("AMD Radeon RX 6800 XT", "Q6_K", "rocm") == "dp4a"
    assert path("AMD Radeon Instinct MI25", "Q4_0", "rocm") == "blas"
    assert path("AMD Instinct MI100", "Q4_0", "rocm") == "mma"
    assert path("AMD Instinct MI100", "Q8_0", "rocm") == "blas"
    assert path("AMD Instinct MI300X", "Q8_0", "rocm") == "mma"
    assert path("AMD Radeon RX 7900 XTX", "Q6_K", "rocm") == "blas"
    assert path("AMD Radeon RX 7900 XTX", "Q4_K", "rocm") == "mma"
    assert path("AMD Radeon AI PRO R9700", "Q6_K", "rocm") == "mma"
    assert path("NVIDIA GeForce RTX 3090", "Q4_K", "vulkan") == "vulkan"


def test_older_build_prefills_slower(tmp_path: Path) -> None:
    """A CUDA build before MMQ became the default dequantized every quantized ubatch for cuBLAS: a Q4_0 model's
    prefill is predicted slower there, by more than an F16 model's, and decode is the same."""
    rig = _rig(_gpu(0, "NVIDIA GeForce RTX 4090", "cuda", 24.0, 1008.0, 165.2))
    q4 = _spec(tmp_path, "q4", LLAMA32_1B, "Q4_0")
    f16 = _spec(tmp_path, "f16", LLAMA32_1B, "F16")

    def best(spec: ModelSpec, build: int | None):
        b = plan(rig, spec, PlanRequest(ctx=4096, split="none", llamacpp_build=build)).best
        assert b is not None
        return b

    new_q4, old_q4 = best(q4, None), best(q4, 3000)
    new_f16, old_f16 = best(f16, None), best(f16, 3000)
    assert old_q4.prefill_tok_s < new_q4.prefill_tok_s
    assert old_q4.prefill_tok_s / new_q4.prefill_tok_s < old_f16.prefill_tok_s / new_f16.prefill_tok_s < 1
    assert old_q4.decode_tok_s == pytest.approx(new_q4.decode_tok_s)
    assert best(q4, 20000).prefill_tok_s == pytest.approx(new_q4.prefill_tok_s)


def test_rocm_copy_stall_only_over_pcie() -> None:
    """A hand-off or all-reduce between ROCm cards without a GPU fabric stalls (issue 17's RX 6800 + RX 6700 XT);
    over an Infinity Fabric link (a profile link that is not PCIe) it does not."""
    from mixrun.rig.profile import Link

    a, b = _gpu(0, "AMD Instinct MI50/MI60", "rocm", 32.0, 1024.0, 26.5), _gpu(1, "AMD Instinct MI50/MI60", "rocm",
                                                                                32.0, 1024.0, 26.5)
    pcie = _rig(a, b)
    fabric = RigProfile(format=FORMAT, name="t", hosts=pcie.hosts, devices=pcie.devices,
                        links=(Link(between=("gpu0", "gpu1"), kind="nvlink", bandwidth_gbs=50.0, latency_us=8.0),))
    stall = cost.costs("llama.cpp", a).pcie_stall_s
    assert stall > 1e-3
    assert cost.stage_cost_s(pcie, "gpu0", "gpu1", "llama.cpp") - cost.stage_cost_s(fabric, "gpu0", "gpu1",
                                                                                      "llama.cpp") == pytest.approx(stall)
    ar_pcie = cost.allreduce_s(pcie, ("gpu0", "gpu1"), 4096 * 4)
    ar_fabric = cost.allreduce_s(fabric, ("gpu0", "gpu1"), 4096 * 4)
    assert ar_pcie - ar_fabric > stall * 0.99
    nv = _rig(_gpu(0, "NVIDIA GeForce RTX 3090", "cuda", 24.0, 936.0, 71.0), _gpu(1, "NVIDIA GeForce RTX 3090", "cuda",
                                                                                  24.0, 936.0, 71.0))
    assert cost.stage_cost_s(nv, "gpu0", "gpu1", "llama.cpp") < 1e-3


def test_build_and_backend_adjustments() -> None:
    """Builds before CUDA graphs pay more per layer per token (not on the CPU, not under torch); Vulkan on NVIDIA
    runs at a share of CUDA's constants; BF16 is slow where the hardware has no BF16; MI300 prefilled through
    rocBLAS before its MMQ kernels."""
    rtx = _gpu(0, "NVIDIA GeForce RTX 3090", "cuda", 24.0, 936.0, 71.0)
    base = cost.layer_overhead_s("llama.cpp", rtx)
    assert cost.layer_overhead_s("llama.cpp", rtx, cost.GRAPHS_BUILD - 1) == pytest.approx(base + cost.OLD_BUILD_LAYER_S)
    assert cost.layer_overhead_s("llama.cpp", rtx, cost.GRAPHS_BUILD) == pytest.approx(base)
    assert cost.layer_overhead_s("torch", rtx, 100) == cost.costs("torch", rtx).layer_overhead_s
    vk = _gpu(0, "NVIDIA GeForce RTX 3090", "vulkan", 24.0, 936.0, 71.0)
    assert cost.costs("llama.cpp", vk).bw_eff == pytest.approx(cost.costs("llama.cpp", rtx).bw_eff
                                                                * cost.VULKAN_NVIDIA_BW)
    assert cost.costs("llama.cpp", vk).prefill_eff < cost.costs("llama.cpp", rtx).prefill_eff
    turing = _gpu(0, "NVIDIA GeForce RTX 2080 Ti", "cuda", 11.0, 616.0, 53.8)
    assert cost.prefill_type_factor(turing, "BF16") == cost.BF16_EMULATED < cost.prefill_type_factor(rtx, "BF16")
    mi300 = _gpu(0, "AMD Instinct MI300X", "rocm", 192.0, 5300.0, 1307.4)
    assert cost.matmul_path(mi300, "Q4_0") == "mma"
    assert cost.prefill_type_factor(mi300, "Q4_0", build=3891) < 0.1 * cost.prefill_type_factor(mi300, "Q4_0")


def _result(model: str, measured: float, cand, prefill: float | None = None) -> Result:
    t = cand.decode
    return Result(model=model, split=cand.split, backend=cand.backend, label=cand.label, decode_tok_s=measured,
                  prefill_tok_s=prefill, predicted_decode_tok_s=cand.decode_tok_s,
                  predicted_prefill_tok_s=cand.prefill_tok_s, predicted_read_s=t.compute_s,
                  predicted_fixed_s=t.tp_comm_s + t.handoff_s + t.overhead_s,
                  devices=tuple(d for g in cand.groups for d in g.devices), date="2026-12-04")


def test_rig_correction_from_two_models(tmp_path: Path, models: dict[str, ModelSpec]) -> None:
    """Two models benched on a CPU rig whose weights stream at 1.6x the predicted time and whose fixed costs are
    0.5x: the fitted correction recovers both factors and predicts a third model's decode exactly."""
    rig = _rig()  # the host CPU alone
    small = _spec(tmp_path, "tiny", dict(n_layers=30, n_embd=576, n_head=9, n_head_kv=3, n_ff=1536, n_vocab=49152),
                  qtype="Q8_0")
    third = _spec(tmp_path, "third", dict(n_layers=12, n_embd=1024, n_head=16, n_head_kv=4, n_ff=2816,
                                          n_vocab=32000), qtype="F16")

    def truth(spec: ModelSpec) -> tuple[object, float]:
        c = plan(rig, spec, PlanRequest(ctx=4096)).best
        assert c is not None
        return c, 1.0 / (1.6 * c.decode.compute_s + 0.5 * (c.decode.overhead_s + c.decode.handoff_s))

    results = []
    for name, spec in (("small.gguf", small), ("big.gguf", models["1b"])):
        c, tok_s = truth(spec)
        results.append(_result(name, tok_s, c, prefill=c.prefill_tok_s / 2))
    (corr,) = cost.fit_corrections(results)
    assert corr.read_factor == pytest.approx(1.6, rel=1e-3) and corr.fixed_factor == pytest.approx(0.5, rel=1e-3)
    assert corr.prefill_factor == pytest.approx(2.0, rel=1e-3) and corr.from_models == ("small.gguf", "big.gguf")
    c3, want = truth(third)
    taught = rig.model_copy(update={"results": tuple(results)})
    got = plan(taught, third, PlanRequest(ctx=4096)).best
    assert got is not None and got.decode_tok_s == pytest.approx(want, rel=1e-3)
    assert got.prefill_tok_s == pytest.approx(c3.prefill_tok_s / 2, rel=1e-3)
    assert "corrected by this rig's runs of small.gguf, big.gguf" in got.why
    assert got.predicted_decode_tok_s == pytest.approx(c3.decode_tok_s)
    # stored corrections take precedence over results, and one result alone scales both parts alike
    (one,) = cost.fit_corrections(results[:1])
    assert one.read_factor == pytest.approx(one.fixed_factor)
    stored = rig.model_copy(update={"results": tuple(results), "corrections": (one,)})
    assert plan(stored, third, PlanRequest(ctx=4096)).best.decode_tok_s == pytest.approx(
        c3.decode_tok_s / one.read_factor, rel=1e-3)
