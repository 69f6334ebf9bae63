"""Predicted decode and prefill time of a candidate, per backend. Every constant is documented, with its source,
in docs/cost-model.md; the figures a profile's ``[[results]]`` recorded replace predictions where present.

Decode, one sequence (memory-bound): a token walks the pipeline stages in turn. A stage costs its slowest
device's bytes read over that device's bandwidth times an efficiency, plus a fixed launch cost per layer;
a TP group adds two collectives per layer (latency plus bytes over the group's slowest link); a hand-off between
stages costs the link's latency plus the hidden state's bytes; each token pays a fixed overhead.
Prefill (compute-bound): FLOPs over the device's matmul rate times an efficiency, with the same communication
terms for the whole prompt; stages overlap when the backend pipelines micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixrun.rig.profile import Device, RigProfile


@dataclass(frozen=True)
class BackendCosts:
    """Efficiency constants of one backend on one class of device (see docs/cost-model.md for each source)."""

    bw_eff: float  # share of the memory bandwidth decode achieves on the weights
    layer_overhead_s: float  # fixed cost per layer per token (kernel launches, synchronisation)
    token_overhead_s: float  # fixed cost per token (graph build, sampling, host round trip)
    prefill_eff: float  # share of the profile's fp16_tflops (dense, FP32 accumulate) prefill achieves
    stage_overhead_s: float = 0.0  # extra cost per pipeline boundary per token (scheduler copies, syncs)
    row_sync_fast_s: float = 0.0  # llama.cpp -sm row: synchronisation per layer over NVLink
    row_sync_slow_s: float = 0.0  # ... and over PCIe
    pipelined_prefill: bool = False


# Calibrated on published llama-bench, vLLM and exllama figures: docs/cost-model.md gives each constant's source.
# The torch GPU figures are targets for mixrun's own runtime (fused GGUF dequant-matmul kernels, CUDA graphs), not
# yet measured; a profile's recorded results replace every prediction they cover.
COSTS: dict[tuple[str, str], BackendCosts] = {
    ("llama.cpp", "gpu"): BackendCosts(bw_eff=0.85, layer_overhead_s=20e-6, token_overhead_s=0.4e-3,
                                       prefill_eff=0.85, stage_overhead_s=150e-6, row_sync_fast_s=75e-6,
                                       row_sync_slow_s=400e-6, pipelined_prefill=True),
    # RTX A-series / PRO / Quadro: their datasheet FP16 rate is not halved like GeForce's, llama.cpp reaches half
    ("llama.cpp", "workstation"): BackendCosts(bw_eff=0.85, layer_overhead_s=20e-6, token_overhead_s=0.4e-3,
                                               prefill_eff=0.425, stage_overhead_s=150e-6, row_sync_fast_s=75e-6,
                                               row_sync_slow_s=400e-6, pipelined_prefill=True),
    ("llama.cpp", "pascal"): BackendCosts(bw_eff=0.73, layer_overhead_s=100e-6, token_overhead_s=0.4e-3,
                                          prefill_eff=0.9, stage_overhead_s=150e-6, row_sync_fast_s=75e-6,
                                          row_sync_slow_s=300e-6, pipelined_prefill=True),
    ("llama.cpp", "datacenter"): BackendCosts(bw_eff=0.70, layer_overhead_s=60e-6, token_overhead_s=0.4e-3,
                                              prefill_eff=0.35, stage_overhead_s=150e-6, row_sync_fast_s=75e-6,
                                              row_sync_slow_s=400e-6, pipelined_prefill=True),
    ("llama.cpp", "cpu"): BackendCosts(bw_eff=0.60, layer_overhead_s=250e-6, token_overhead_s=0.5e-3,
                                       prefill_eff=1.0),
    ("torch", "gpu"): BackendCosts(bw_eff=0.85, layer_overhead_s=30e-6, token_overhead_s=1.0e-3, prefill_eff=0.6,
                                   stage_overhead_s=50e-6, pipelined_prefill=True),
    ("torch", "pascal"): BackendCosts(bw_eff=0.60, layer_overhead_s=100e-6, token_overhead_s=1.0e-3,
                                      prefill_eff=0.6, stage_overhead_s=50e-6, pipelined_prefill=True),
    ("torch", "workstation"): BackendCosts(bw_eff=0.85, layer_overhead_s=30e-6, token_overhead_s=1.0e-3,
                                           prefill_eff=0.3, stage_overhead_s=50e-6, pipelined_prefill=True),
    ("torch", "datacenter"): BackendCosts(bw_eff=0.85, layer_overhead_s=30e-6, token_overhead_s=1.0e-3,
                                          prefill_eff=0.5, stage_overhead_s=50e-6, pipelined_prefill=True),
    # CPU: measured against llama.cpp in one run (benchmarks/torch_vs_llamacpp.py, docs/cost-model.md)
    ("torch", "cpu"): BackendCosts(bw_eff=0.60, layer_overhead_s=250e-6, token_overhead_s=0.5e-3, prefill_eff=0.5),
}
# One all-reduce: a fixed launch cost plus hops of the slowest link's latency, plus the bytes. llama.cpp's ring
# takes 2(n-1) hops; mixrun's torch backend, like vLLM's one-shot all-reduce for small messages, takes 2.
# 2 GPUs over PCIe (10 us) give 35 us, about the 75 us per layer (two all-reduces) llama.cpp -sm tensor measures.
ALLREDUCE_BASE_S = 15e-6
_PASCAL = ("P40", "P100", "P4 ", "P6000", "GTX 10", "TITAN X", "TITAN Xp")
_WORKSTATION = ("RTX A", "RTX PRO", "Quadro", "Ada Generation", "RTX 6000", "RTX 5000", "RTX 4000")
_DATACENTER = ("A100", "A800", "H100", "H800", "H200", "GH200", "B200", "B100", "V100")


def device_class(device: Device) -> str:
    if device.backend == "cpu":
        return "cpu"
    name = device.name + " "
    if any(k in name for k in _PASCAL):
        return "pascal"
    if any(k in name for k in _DATACENTER):
        return "datacenter"
    if any(k in name for k in _WORKSTATION) and "GeForce" not in name:
        return "workstation"
    return "gpu"


def costs(backend: str, device: Device) -> BackendCosts:
    return COSTS[(backend, device_class(device))]


# On a GPU the torch backend keeps quantized matrices in their GGUF blocks and multiplies them with its fused Triton
# kernels (backends/torch/kernels.py), which read each block once but gather it byte by byte, untuned. Not measured
# on a GPU yet: they are assumed to stream blocks at QUANT_KERNEL_EFF of the rate dense products reach (the rate
# bw_eff sets); benchmarks/torch_gpu_kernels.py measures it. Without triton (e.g. torch on Windows) the runtime
# expands each matrix with torch operations instead, about 50 bytes of traffic per weight (benchmarks/
# dequant_traffic.py), and says so when it starts.
QUANT_KERNEL_EFF = 0.6


def quant_kernel_bytes(n_bytes: float, device: Device, backend: str) -> float:
    """What streaming ``n_bytes`` of quantized blocks through the fused kernels costs beyond reading them at the
    dense rate, in bytes at that rate (torch on a GPU; CPU ranks hold float32 copies and pay nothing)."""
    return n_bytes * (1 / QUANT_KERNEL_EFF - 1) if backend == "torch" and device.backend != "cpu" else 0.0


def read_time_s(n_bytes: float, device: Device, backend: str) -> float:
    """Seconds to stream ``n_bytes`` of weights from a device's memory during decode."""
    return n_bytes / (device.mem_bandwidth_gbs * 1e9 * costs(backend, device).bw_eff)


def flop_time_s(flops: float, device: Device, backend: str) -> float:
    return flops / (device.fp16_tflops * 1e12 * costs(backend, device).prefill_eff)


def transfer_s(profile: RigProfile, a: str, b: str, n_bytes: float) -> float:
    link = profile.link(a, b)
    return (link.latency_us or 10.0) * 1e-6 + n_bytes / (link.bandwidth_gbs * 1e9)


def allreduce_s(profile: RigProfile, devices: tuple[str, ...], n_bytes: float, one_shot: bool = False) -> float:
    """One all-reduce of ``n_bytes`` over a group: a launch cost, the slowest link's latency per hop (2(n-1) hops
    for a ring, 2 for a one-shot all-reduce), and 2(n-1)/n of the bytes over the slowest link."""
    n = len(devices)
    if n < 2:
        return 0.0
    links = [profile.link(a, b) for i, a in enumerate(devices) for b in devices[i + 1:]]
    bw = min(lk.bandwidth_gbs for lk in links) * 1e9
    lat = max(lk.latency_us or 10.0 for lk in links) * 1e-6
    hops = 2 if one_shot else 2 * (n - 1)
    return ALLREDUCE_BASE_S + hops * lat + 2 * (n - 1) / n * n_bytes / bw
