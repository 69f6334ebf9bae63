"""The llama.cpp backend's side of a plan: Llama() kwargs per split mode, the live memory check, load progress and
Ctrl-C during a load."""

from __future__ import annotations

import inspect
import os
import signal
import types
from typing import Any

import llama_cpp
import pytest

from mixrun.backends.llamacpp import LlamaCppEngine, llama_kwargs
from mixrun.backends.llamacpp_load import LoadProgress
from mixrun.errors import MixrunError
from mixrun.model.spec import ModelSpec
from mixrun.planner import PlanRequest, plan
from mixrun.rig.profile import load_profile
from mixrun.run import free_memory, preflight

LLAMA_PARAMS = set(inspect.signature(llama_cpp.Llama.__init__).parameters)


def _chosen(profile: str, spec: ModelSpec, **req: Any) -> Any:
    report = plan(load_profile(profile), spec, PlanRequest(backend="llama.cpp", **req))
    assert report.best is not None
    return report.best


def _check_keys(kwargs: dict[str, Any]) -> None:
    """Every key is a ``Llama()`` argument, or one the engine applies itself through ctypes (llamacpp_overrides)."""
    assert set(kwargs) <= LLAMA_PARAMS | {"devices", "override_tensor"}, set(kwargs) - LLAMA_PARAMS


def test_none_and_cpu(small_spec: ModelSpec) -> None:
    one = llama_kwargs(_chosen("4090-plus-p40", small_spec, split="none"), llama_cpp)
    _check_keys(one)
    assert one["split_mode"] == llama_cpp.LLAMA_SPLIT_MODE_NONE and one["n_gpu_layers"] == -1
    assert one["main_gpu"] == 0  # the 4090 is the faster card and holds the whole model
    cpu = llama_kwargs(_chosen("cpu-only", small_spec), llama_cpp)
    _check_keys(cpu)
    assert cpu["n_gpu_layers"] == 0 and "split_mode" not in cpu


def test_layer_split_counts_layers_and_the_output(llama70b: ModelSpec) -> None:
    cand = _chosen("dual-3090-nvlink-plus-3060", llama70b, split="layer")
    kw = llama_kwargs(cand, llama_cpp)
    _check_keys(kw)
    assert kw["split_mode"] == llama_cpp.LLAMA_SPLIT_MODE_LAYER and kw["n_gpu_layers"] == -1
    # -ts is in layers: every layer once, plus the output layer on the last GPU used
    assert sum(kw["tensor_split"]) == llama70b.n_layers + 1 and len(kw["tensor_split"]) == 3
    counts = {g.devices[0]: g.n_layers for g in cand.groups}
    assert kw["tensor_split"][:2] == [counts.get("gpu0", 0), counts.get("gpu1", 0)] or sum(counts.values()) == 80


def test_layer_offload_sets_gpu_layers(llama70b: ModelSpec) -> None:
    cand = _chosen("2x-5060ti-pcie", llama70b, split="layer", cpu_offload=True)
    kw = llama_kwargs(cand, llama_cpp)
    cpu_layers = sum(g.n_layers for g in cand.groups if g.devices[0] == "cpu")
    assert cpu_layers > 0 and kw["n_gpu_layers"] == llama70b.n_layers - cpu_layers
    assert sum(kw["tensor_split"]) == llama70b.n_layers - cpu_layers  # the output stays with the CPU


def test_row_and_tensor(llama70b: ModelSpec) -> None:
    rowk = llama_kwargs(_chosen("4x-3090-pcie", llama70b, split="row"), llama_cpp)
    _check_keys(rowk)
    assert rowk["split_mode"] == llama_cpp.LLAMA_SPLIT_MODE_ROW and 0 <= rowk["main_gpu"] < 4
    cand = _chosen("dual-3090-nvlink", llama70b, split="tensor")
    tens = llama_kwargs(cand, llama_cpp)
    assert tens["split_mode"] == llama_cpp.LLAMA_SPLIT_MODE_TENSOR and tens["flash_attn"] is True
    assert tens["tensor_split"] == [0.5, 0.5]  # shares llama.cpp rounds per tensor itself (planner.tensor_split)
    _check_keys(tens)
    odd = llama_kwargs(_chosen("dual-3090-nvlink-plus-3060", llama70b, split="tensor"), llama_cpp)
    assert odd["devices"] == ["CUDA0", "CUDA1"]  # the 3060 is left out of llama.cpp's device list


def test_kv_type_and_refusals(llama70b: ModelSpec) -> None:
    kw = llama_kwargs(_chosen("dual-3090-nvlink-plus-3060", llama70b, split="layer", kv_type="q8_0"), llama_cpp)
    assert kw["type_k"] == kw["type_v"] == llama_cpp.GGML_TYPE_Q8_0
    hybrid = plan(load_profile("dual-3090-nvlink-plus-3060"), llama70b, PlanRequest(split="hybrid")).best
    with pytest.raises(MixrunError, match="torch plan does not run on llama.cpp"):
        llama_kwargs(hybrid, llama_cpp)
    old = types.SimpleNamespace(**{k: getattr(llama_cpp, k) for k in dir(llama_cpp)
                                   if k.startswith("LLAMA_SPLIT_MODE") and k != "LLAMA_SPLIT_MODE_TENSOR"})
    with pytest.raises(MixrunError, match="no tensor split mode"):
        llama_kwargs(_chosen("dual-3090-nvlink", llama70b, split="tensor"), old)


class FakeNVML:
    def __init__(self, free: list[int]) -> None:
        self.free = free

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: return len(self.free)
    def nvmlDeviceGetHandleByIndex(self, i: int) -> int: return i
    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any: return types.SimpleNamespace(free=self.free[h])


def test_preflight_against_memory_free_now(llama70b: ModelSpec) -> None:
    prof = load_profile("dual-3090-nvlink-plus-3060")
    cand = _chosen("dual-3090-nvlink-plus-3060", llama70b, split="layer")
    gib = 2**30
    roomy = FakeNVML([24 * gib, 24 * gib, 12 * gib])
    free = free_memory(prof, cand, roomy).free_bytes
    assert set(free) == {d.id for d in cand.devices} == {"cpu", "gpu0", "gpu1"}  # the 3060 is not needed at 4k
    assert free["gpu0"] == free["gpu1"] == 24 * gib and free["cpu"] > 0  # the host holds token_embd
    assert preflight(prof, cand, nvml=roomy) == []
    busy = FakeNVML([24 * gib, 4 * gib, 12 * gib])  # a game holds 20 GiB of gpu1
    with pytest.raises(MixrunError, match=r"does not fit the memory free now: gpu1 needs [0-9.]+ GiB, 4.00 GiB free"):
        preflight(prof, cand, nvml=busy)
    warned: list[str] = []
    preflight(prof, cand, nvml=busy, force=True, warn=warned.append)
    assert warned and "gpu1" in warned[0]
    one_gpu = FakeNVML([24 * gib])
    notes = preflight(prof, cand, nvml=one_gpu)
    assert notes == ["gpu1 of dual-3090-nvlink-plus-3060 not found on this machine: running on what is here"]


def test_preflight_without_gpus_checks_host_memory(llama70b: ModelSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    prof = load_profile("dual-3090-nvlink-plus-3060")
    cand = _chosen("dual-3090-nvlink-plus-3060", llama70b, split="layer")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=8 * 2**30))
    with pytest.raises(MixrunError, match="this machine's memory: needs 4[0-9].[0-9]+ GiB, 8.00 GiB free now"):
        preflight(prof, cand, nvml=FakeNVML([]))


def test_load_progress_and_ctrl_c_during_load(smollm2: str) -> None:
    seen: list[float] = []

    class Recording(LoadProgress):
        def __call__(self, fraction: float, _u: Any = None) -> bool:
            seen.append(fraction)
            return super().__call__(fraction)

    eng = LlamaCppEngine(smollm2, n_ctx=256, progress=Recording("m"))
    eng.close()
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)

    class CtrlC(LoadProgress):
        calls = 0

        def __call__(self, fraction: float, _u: Any = None) -> bool:
            CtrlC.calls += 1
            if CtrlC.calls == 1:
                os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C while the weights load
            return super().__call__(fraction)

    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        LlamaCppEngine(smollm2, n_ctx=256, progress=CtrlC("m"))
    assert CtrlC.calls < len(seen)  # the load stopped at the next progress report
    assert signal.getsignal(signal.SIGINT) is handler
