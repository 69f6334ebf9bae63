"""This machine -> RigProfile: NVIDIA GPUs through NVML, measured with torch.cuda when present; the CPU host is
always a device too (its RAM, cores, and memory bandwidth measured with a large copy). NVML and psutil are read
through :mod:`mixrun.rig.probe`.

Never raises because a driver or library is missing: what cannot be read is left out and said in ``notes``.
NVML numbers GPUs physically while CUDA follows ``CUDA_VISIBLE_DEVICES``, so the two are matched by PCI bus id.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mixrun import __version__
from mixrun.rig.probe import Nvml, host_cores, host_total_bytes, normalize_bus_id
from mixrun.rig.profile import FORMAT, GIB, Device, Host, Link, RigProfile

# One-direction PCIe rate per lane in GB/s by generation (after 8b/10b or 128b/130b encoding).
PCIE_LANE_GBS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
PCIE_EFFICIENCY = 0.8  # achieved share of the raw PCIe rate for large copies
Progress = Callable[[str], None]


@dataclass
class GPUInfo:
    """What NVML says about one GPU (bytes are ints; rates in GB/s and TFLOP/s)."""

    index: int
    name: str
    memory_bytes: int
    bus_id: str
    mem_bandwidth_gbs: float | None = None
    fp16_tflops: float | None = None
    pcie_gen: int | None = None
    pcie_width: int | None = None
    nvlink_peers: dict[str, int] = field(default_factory=dict)  # peer bus id -> active links
    nvlink_version: int | None = None
    nvswitch_links: int = 0
    compute_capability: tuple[int, int] | None = None


def _tensor_factor(cc: tuple[int, int] | None, name: str) -> float:
    """Dense FP16 tensor rate (FP32 accumulate) over the FP32 FMA rate, by architecture and product line."""
    if cc is None:
        return 1.0
    geforce = "geforce" in name.lower() or "titan" in name.lower()
    major, minor = cc
    if major < 7:
        return 1.0  # Pascal and older: no tensor cores; llama.cpp runs them on FP32 math
    if (major, minor) in ((8, 0), (9, 0)):
        return 16.0  # A100, H100/H200
    if major == 7:
        return 4.0 if geforce else 8.0
    return 2.0 if geforce else 4.0  # Ampere/Ada/Blackwell GeForce halve the FP32-accumulate rate


def _nvml_gpus(nv: Nvml, notes: list[str]) -> list[GPUInfo]:
    """Read every GPU through an open NVML session (``pynvml`` or a test double); a GPU whose name, memory or bus
    id NVML cannot give is left out, with a note."""
    nvml = nv.lib
    gpus: list[GPUInfo] = []
    for i in range(nv.count()):
        h, mem = nv.handle(i), nv.memory(i)
        name = _try(lambda h=h: nvml.nvmlDeviceGetName(h))
        bus_id = _try(lambda h=h: nvml.nvmlDeviceGetPciInfo(h).busId)
        if h is None or mem is None or name is None or bus_id is None:
            notes.append(f"NVML GPU {i}: cannot read its name, memory or PCI bus id; left out")
            continue
        name = name.decode() if isinstance(name, bytes) else name
        g = GPUInfo(index=i, name=name, memory_bytes=mem.total_bytes, bus_id=normalize_bus_id(bus_id))
        g.compute_capability = _try(lambda h=h: tuple(nvml.nvmlDeviceGetCudaComputeCapability(h)))
        mem_clock = _try(lambda h=h: nvml.nvmlDeviceGetMaxClockInfo(h, nvml.NVML_CLOCK_MEM))
        bus_width = _try(lambda h=h: nvml.nvmlDeviceGetMemoryBusWidth(h))
        if mem_clock and bus_width:  # NVML reports half the effective data rate: x2 for DDR
            g.mem_bandwidth_gbs = round(mem_clock * 2 * bus_width / 8 / 1000, 1)
        cores = _try(lambda h=h: nvml.nvmlDeviceGetNumGpuCores(h))
        sm_clock = _try(lambda h=h: nvml.nvmlDeviceGetMaxClockInfo(h, nvml.NVML_CLOCK_SM))
        if cores and sm_clock:
            fp32 = cores * sm_clock * 2 / 1e6
            g.fp16_tflops = round(fp32 * _tensor_factor(g.compute_capability, name), 1)
        g.pcie_gen = _try(lambda h=h: nvml.nvmlDeviceGetMaxPcieLinkGeneration(h))
        g.pcie_width = _try(lambda h=h: nvml.nvmlDeviceGetCurrPcieLinkWidth(h))
        for link in range(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18)):
            state = _try(lambda h=h, link=link: nvml.nvmlDeviceGetNvLinkState(h, link))
            if state != getattr(nvml, "NVML_FEATURE_ENABLED", 1):
                continue
            g.nvlink_version = g.nvlink_version or _try(lambda h=h, link=link: nvml.nvmlDeviceGetNvLinkVersion(h, link))
            remote_type = _try(lambda h=h, link=link: nvml.nvmlDeviceGetNvLinkRemoteDeviceType(h, link))
            if remote_type == getattr(nvml, "NVML_NVLINK_DEVICE_TYPE_SWITCH", 2):
                g.nvswitch_links += 1
                continue
            remote = _try(lambda h=h, link=link: nvml.nvmlDeviceGetNvLinkRemotePciInfo_v2(h, link).busId)
            if remote is not None:
                peer = normalize_bus_id(remote)
                g.nvlink_peers[peer] = g.nvlink_peers.get(peer, 0) + 1
        gpus.append(g)
    if not gpus:
        notes.append("NVML found no GPUs")
    return gpus


def _try(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception:  # NVML raises NVMLError_NotSupported and friends for metrics a GPU lacks
        return None


def nvlink_gbs_per_link(version: int | None, name: str) -> float:
    """One-direction bandwidth of one NVLink link: NVLink 2 and datacenter NVLink 3/4 carry 25 GB/s; the GeForce
    and RTX-A bridges of NVLink 3 carry 14.0625 GB/s per link (4 links = 56.25 GB/s on an RTX 3090)."""
    if version is not None and version >= 3 and not any(x in name for x in ("A100", "H100", "H200", "H800", "A800")):
        return 14.0625
    return 25.0


def gpu_links(gpus: list[GPUInfo], ids: dict[str, str]) -> list[Link]:
    """NVLink/NVSwitch links between detected GPUs; ``ids`` maps bus id -> profile device id."""
    links: list[Link] = []
    done: set[frozenset[str]] = set()
    switched = [g for g in gpus if g.nvswitch_links]
    for a in gpus:
        for peer, n in a.nvlink_peers.items():
            if peer not in ids or frozenset((a.bus_id, peer)) in done:
                continue
            done.add(frozenset((a.bus_id, peer)))
            links.append(Link(between=(ids[a.bus_id], ids[peer]), kind="nvlink",
                              bandwidth_gbs=round(n * nvlink_gbs_per_link(a.nvlink_version, a.name), 2),
                              latency_us=8.0, source="datasheet"))
    for i, a in enumerate(switched):
        for b in switched[i + 1:]:
            if frozenset((a.bus_id, b.bus_id)) in done:
                continue
            n = min(a.nvswitch_links, b.nvswitch_links)
            links.append(Link(between=(ids[a.bus_id], ids[b.bus_id]), kind="nvswitch",
                              bandwidth_gbs=round(n * nvlink_gbs_per_link(a.nvlink_version, a.name), 2),
                              latency_us=6.0, source="datasheet"))
    return links


# ---- the CPU host ------------------------------------------------------------------------------------------------


def cpu_info(text: str | None = None) -> tuple[str, frozenset[str]]:
    """(model name, instruction-set flags) of this CPU from ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``);
    the name from ``platform`` and no flags where that file does not exist."""
    if text is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                text = f.read(1 << 20)
        except OSError:
            text = ""
    name, flags = "", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not name:
            name = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
        elif not key and name and flags:
            break  # the first processor's block is enough
    return name or platform.processor() or platform.machine() or "CPU", flags


def measure_host_bandwidth_gbs(n_bytes: int = 256 << 20, repeats: int = 5, budget_s: float = 3.0) -> float:
    """Host memory bandwidth in GB/s: the best of ``repeats`` copies of an ``n_bytes`` array (far beyond any CPU
    cache), counting bytes read plus bytes written, as STREAM's copy does. Stops early once ``budget_s`` seconds
    have gone (at least one copy runs), so a slow or busy machine does not stall ``profile detect``. The planner
    uses it for the experts a MoE plan leaves in RAM (planner/moe.py); one thread's copy is a lower bound of
    what llama.cpp's threads reach."""
    import numpy as np

    src = np.ones(n_bytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # first touch: page faults are not bandwidth
    best = float("inf")
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return round(2 * src.nbytes / best / 1e9, 1)


def measure_host_tflops(n: int = 1024, repeats: int = 5) -> float:
    """Best-of-N float32 matrix product through numpy's BLAS: the CPU's dense matmul rate."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.copy()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return round(2 * n**3 / best / 1e12, 3)


# ---- CUDA measurements -------------------------------------------------------------------------------------------


def _measure_cuda(gpus: list[GPUInfo], progress: Progress, notes: list[str]) -> dict[str, dict[str, float]]:
    """Measured GB/s and TFLOP/s per GPU bus id, and peer bandwidth/latency per pair, through torch.cuda."""
    try:
        import torch
    except ImportError:
        notes.append("torch is not installed: GPU figures come from NVML clocks, not measurements")
        return {}
    if not torch.cuda.is_available():
        notes.append("torch.cuda is not available: GPU figures come from NVML clocks, not measurements")
        return {}
    by_bus = {}
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        bus = f"{p.pci_domain_id:04x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
        by_bus[bus] = i
    out: dict[str, dict[str, float]] = {}
    for g in gpus:
        if g.bus_id not in by_bus:
            continue
        dev = torch.device("cuda", by_bus[g.bus_id])
        progress(f"measuring {g.name} (cuda:{dev.index}) memory bandwidth and fp16 matmul")
        out[g.bus_id] = {"mem_bandwidth_gbs": _copy_gbs(torch, dev, dev, 1 << 30, both_ways=True),
                         "fp16_tflops": _matmul_tflops(torch, dev)}
    for ga in gpus:
        for gb in gpus:
            if ga.bus_id >= gb.bus_id or ga.bus_id not in by_bus or gb.bus_id not in by_bus:
                continue
            da, db = torch.device("cuda", by_bus[ga.bus_id]), torch.device("cuda", by_bus[gb.bus_id])
            progress(f"measuring link cuda:{da.index} <-> cuda:{db.index}")
            bw = _copy_gbs(torch, da, db, 256 << 20)
            lat_us = 4 / (_copy_gbs(torch, da, db, 4) * 1e9) * 1e6  # a 4-byte copy: all latency
            out[f"{ga.bus_id}|{gb.bus_id}"] = {"bandwidth_gbs": bw, "latency_us": round(lat_us, 2)}
    return out


def _copy_gbs(torch: Any, src_dev: Any, dst_dev: Any, n_bytes: int, both_ways: bool = False) -> float:
    """GB/s of a copy of ``n_bytes`` from one device to another; ``both_ways`` counts read plus write bytes
    (for a copy within one device's memory)."""
    src = torch.empty(max(n_bytes // 4, 1), dtype=torch.float32, device=src_dev)
    dst = torch.empty_like(src, device=dst_dev)
    seconds = _cuda_time(lambda: dst.copy_(src), src_dev, dst_dev)
    return round((2 if both_ways else 1) * src.nbytes / seconds / 1e9, 2)


def _matmul_tflops(torch: Any, dev: Any, n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=torch.float16, device=dev)
    return round(2 * n**3 / _cuda_time(lambda: a @ a, dev) / 1e12, 1)


def _cuda_time(fn: Callable[[], Any], *devices: Any, repeats: int = 10) -> float:
    import torch

    for _ in range(2):
        fn()
    for d in devices:
        torch.cuda.synchronize(d)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        for d in devices:
            torch.cuda.synchronize(d)
        best = min(best, time.perf_counter() - t0)
    return best


# ---- putting it together -----------------------------------------------------------------------------------------


def detect(*, nvml: Any = None, measure: bool = True, progress: Progress | None = None,
           name: str | None = None, llamacpp_extra_buffers: tuple[str, ...] | None = None) -> tuple[RigProfile, list[str]]:
    """Profile this machine. ``nvml`` is an NVML module to use instead of importing ``pynvml`` (tests pass a
    double); ``llamacpp_extra_buffers`` is what llama.cpp's CPU probe found for this host (the caller runs it:
    discovery does not load llama.cpp). Returns the profile and notes saying what could not be found or measured."""
    progress = progress or (lambda _msg: None)
    notes: list[str] = []
    gpus: list[GPUInfo] = []
    with Nvml(nvml) as nv:
        if nv.lib is None:
            notes.append(nv.why or "NVML is not available")
        else:
            gpus = _nvml_gpus(nv, notes)

    ram = host_total_bytes()
    cores = host_cores()
    host = platform.node() or "local"
    host_id = "".join(c if c.isalnum() or c in "_.-" else "-" for c in host)[:64].strip("-.") or "local"
    cpu_bw, cpu_tflops, cpu_source = 20.0, 0.1, "datasheet"
    if measure:
        progress("measuring host memory bandwidth (256 MiB copy)")
        cpu_bw = measure_host_bandwidth_gbs()
        progress("measuring host matmul rate")
        cpu_tflops = max(measure_host_tflops(), 0.001)
        cpu_source = "measured"

    ids = {g.bus_id: f"gpu{g.index}" for g in gpus}
    measured = _measure_cuda(gpus, progress, notes) if (measure and gpus) else {}
    devices: list[Device] = []
    pcie_rates = []
    for g in gpus:
        m = measured.get(g.bus_id, {})
        if g.pcie_gen in PCIE_LANE_GBS and g.pcie_width:
            pcie_rates.append(PCIE_LANE_GBS[g.pcie_gen] * g.pcie_width * PCIE_EFFICIENCY)
        devices.append(Device(
            id=ids[g.bus_id], backend="cuda", name=g.name, vram_gib=round(g.memory_bytes / GIB, 3),
            mem_bandwidth_gbs=m.get("mem_bandwidth_gbs") or g.mem_bandwidth_gbs or 300.0,
            fp16_tflops=m.get("fp16_tflops") or g.fp16_tflops or 10.0, pci_bus_id=g.bus_id,
            source="measured" if m else "datasheet"))
    devices.append(Device(id="cpu", backend="cpu", name=cpu_info()[0], vram_gib=round(ram / GIB, 2),
                          reserved_gib=round(min(4.0, ram / GIB / 4), 2), mem_bandwidth_gbs=cpu_bw,
                          fp16_tflops=cpu_tflops, source=cpu_source))
    links = gpu_links(gpus, ids)
    for key, m in measured.items():
        if "|" not in key:
            continue
        a, b = (ids[x] for x in key.split("|"))
        kind = next((lk.kind for lk in links if set(lk.between) == {a, b}), "pcie")
        links = [lk for lk in links if set(lk.between) != {a, b}]
        links.append(Link(between=(a, b), kind=kind, bandwidth_gbs=m["bandwidth_gbs"],
                          latency_us=max(m["latency_us"], 0.1), source="measured"))
    if not gpus:
        notes.append("profile holds the CPU host only")
    profile = RigProfile(
        format=FORMAT, name=name or host_id, description=f"Detected by mixrun {__version__} on {host}",
        source="measured" if measure else "datasheet",
        hosts=(Host(id=host_id, ram_gib=round(ram / GIB, 2), cpu_cores=cores,
                    pcie_gbs=round(min(pcie_rates), 2) if pcie_rates else 25.0,
                    llamacpp_extra_buffers=llamacpp_extra_buffers),),
        devices=tuple(Device(**{**d.model_dump(), "host": host_id}) for d in devices),
        links=tuple(links), extra={"notes": notes} if notes else {},
    )
    return profile, notes
