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

from mixrun.planner.types import Timing
from mixrun.profile import Device, RigProfile

F16 = 2
F32 = 4


@dataclass(frozen=True)
class BackendCosts:
    """Efficiency constants of one backend on one kind of device (see docs/cost-model.md)."""

    bw_eff: float  # share of the memory bandwidth decode achieves on large matrices
    layer_overhead_s: float  # fixed cost per layer per token (kernel launches, synchronisation)
    token_overhead_s: float  # fixed cost per token (graph build, sampling, host round trip)
    prefill_eff: float  # share of the dense matmul rate prefill achieves
    row_syncs_per_layer: int = 0  # llama.cpp -sm row: gathers to the main GPU per layer
    pipelined_prefill: bool = False


# Calibrated on published llama-bench/vLLM figures; see docs/cost-model.md for each source and fit.
COSTS: dict[tuple[str, str], BackendCosts] = {
    ("llama.cpp", "gpu"): BackendCosts(bw_eff=0.80, layer_overhead_s=45e-6, token_overhead_s=0.4e-3,
                                       prefill_eff=0.55, row_syncs_per_layer=7, pipelined_prefill=True),
    ("llama.cpp", "cpu"): BackendCosts(bw_eff=0.65, layer_overhead_s=25e-6, token_overhead_s=0.3e-3,
                                       prefill_eff=0.45),
    ("torch", "gpu"): BackendCosts(bw_eff=0.60, layer_overhead_s=90e-6, token_overhead_s=1.5e-3, prefill_eff=0.45,
                                   pipelined_prefill=True),
    ("torch", "cpu"): BackendCosts(bw_eff=0.35, layer_overhead_s=120e-6, token_overhead_s=2e-3, prefill_eff=0.30),
}


def costs(backend: str, device: Device) -> BackendCosts:
    return COSTS[(backend, "cpu" if device.backend == "cpu" else "gpu")]


def read_time_s(n_bytes: float, device: Device, backend: str) -> float:
    """Seconds to stream ``n_bytes`` of weights from a device's memory during decode."""
    return n_bytes / (device.mem_bandwidth_gbs * 1e9 * costs(backend, device).bw_eff)


def flop_time_s(flops: float, device: Device, backend: str) -> float:
    return flops / (device.fp16_tflops * 1e12 * costs(backend, device).prefill_eff)


def transfer_s(profile: RigProfile, a: str, b: str, n_bytes: float) -> float:
    link = profile.link(a, b)
    return (link.latency_us or 10.0) * 1e-6 + n_bytes / (link.bandwidth_gbs * 1e9)


def allreduce_s(profile: RigProfile, devices: tuple[str, ...], n_bytes: float) -> float:
    """One ring all-reduce of ``n_bytes`` over a group: latency plus 2(n-1)/n of the bytes over the slowest link."""
    n = len(devices)
    if n < 2:
        return 0.0
    links = [profile.link(a, b) for i, a in enumerate(devices) for b in devices[i + 1:]]
    bw = min(lk.bandwidth_gbs for lk in links) * 1e9
    lat = max(lk.latency_us or 10.0 for lk in links) * 1e-6
    return lat + 2 * (n - 1) / n * n_bytes / bw


def sum_timings(parts: list[Timing]) -> Timing:
    return Timing(compute_s=sum(p.compute_s for p in parts), tp_comm_s=sum(p.tp_comm_s for p in parts),
                  handoff_s=sum(p.handoff_s for p in parts), overhead_s=sum(p.overhead_s for p in parts))
