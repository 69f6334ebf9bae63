"""Telemetry snapshots: plain values a running engine hands to the chat ``/stats``, the TUI and ``mixrun bench``.

Engines count what they do (per-stage compute time, bytes all-reduced inside a TP group, bytes sent between
stages, tokens); :class:`DeviceSampler` adds what the hardware says (NVML for GPUs when present, the processes'
RSS and CPU for CPU devices). Counters are cumulative so a reader can difference two snapshots for rates.
A metric that is not available is ``None`` and renders as "n/a".
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DeviceSample:
    """One device now. ``memory_*`` in bytes; ``util_pct`` 0-100 (GPU utilization or the processes' CPU)."""

    id: str
    kind: str  # "cuda" | "cpu"
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    util_pct: float | None = None


@dataclass(frozen=True)
class LinkSample:
    """Bytes carried so far between two planned devices: ``tp`` all-reduce traffic or ``pipeline`` hand-offs."""

    between: tuple[str, str]
    kind: str  # "tp" | "pipeline"
    bytes_total: int


@dataclass(frozen=True)
class StageSample:
    """A pipeline stage: its devices, layers ``[start, end)`` and compute seconds of the last token and so far."""

    devices: tuple[str, ...]
    layers: tuple[int, int]
    last_token_s: float
    total_s: float


@dataclass(frozen=True)
class Snapshot:
    """Everything a monitor shows, at time ``t`` (``time.monotonic`` seconds)."""

    t: float
    backend: str
    tokens_total: int = 0  # tokens generated so far (all answers)
    decode_tok_s: float | None = None  # last answer's decode rate
    prefill_tok_s: float | None = None
    predicted_decode_tok_s: float | None = None
    predicted_prefill_tok_s: float | None = None
    devices: tuple[DeviceSample, ...] = ()
    links: tuple[LinkSample, ...] = ()
    stages: tuple[StageSample, ...] = ()

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


@dataclass
class DeviceSampler:
    """Samples planned devices: ``cuda_index`` maps a device id to its NVML index; ``pids`` maps a device id to
    the processes standing in for it (CPU devices, or ``--simulate`` ranks). NVML is tried once."""

    cuda_index: dict[str, int] = field(default_factory=dict)
    pids: dict[str, list[int]] = field(default_factory=dict)
    _nvml: Any = None
    _procs: dict[int, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cuda_index:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception:  # no driver, no library: GPU figures become n/a
                self._nvml = None

    def sample(self) -> tuple[DeviceSample, ...]:
        out = []
        for dev, idx in self.cuda_index.items():
            out.append(self._cuda(dev, idx))
        for dev, pids in self.pids.items():
            if dev not in self.cuda_index:
                out.append(self._cpu(dev, pids))
        return tuple(out)

    def _cuda(self, dev: str, idx: int) -> DeviceSample:
        nv = self._nvml
        if nv is None:
            return DeviceSample(dev, "cuda")
        try:
            h = nv.nvmlDeviceGetHandleByIndex(idx)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            util = nv.nvmlDeviceGetUtilizationRates(h).gpu
            return DeviceSample(dev, "cuda", int(mem.used), int(mem.total), float(util))
        except Exception:
            return DeviceSample(dev, "cuda")

    def _cpu(self, dev: str, pids: list[int]) -> DeviceSample:
        import psutil

        rss, cpu = 0, 0.0
        for pid in pids:
            proc = self._procs.get(pid)
            try:
                if proc is None:
                    proc = self._procs[pid] = psutil.Process(pid)
                    proc.cpu_percent(None)  # the first call primes the counter
                rss += proc.memory_info().rss
                cpu += proc.cpu_percent(None)
            except psutil.Error:
                continue
        return DeviceSample(dev, "cpu", rss, psutil.virtual_memory().total, cpu)

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None


def now() -> float:
    return time.monotonic()
