"""What the hardware says about a running plan's devices now, as telemetry values: NVML for GPUs when present, the
processes' resident memory and CPU use for CPU devices (or for ``--simulate`` ranks standing in for GPUs).

Engines hold one :class:`DeviceSampler` while they run and put its samples into their telemetry snapshots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mixrun.rig.probe import Nvml, ProcessMeter, host_total_bytes
from mixrun.telemetry import DeviceSample


@dataclass
class DeviceSampler:
    """Samples planned devices: ``cuda_index`` maps a device id to its CUDA index (read at the NVML index
    :meth:`Nvml.cuda_to_nvml` gives, so ``CUDA_VISIBLE_DEVICES`` applies); ``pids`` maps a device id to
    the processes standing in for it (CPU devices, or ``--simulate`` ranks). NVML is opened once, only when a
    device is a GPU, and held until :meth:`close`; without it GPU figures are ``None`` ("n/a")."""

    cuda_index: dict[str, int] = field(default_factory=dict)
    pids: dict[str, list[int]] = field(default_factory=dict)
    _nvml: Nvml = field(default_factory=Nvml)
    _procs: ProcessMeter = field(default_factory=ProcessMeter)
    _to_nvml: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.cuda_index:
            self._nvml.open()
            self._to_nvml = self._nvml.cuda_to_nvml()

    def sample(self) -> tuple[DeviceSample, ...]:
        out = [self._cuda(dev, self._to_nvml[idx]) if 0 <= idx < len(self._to_nvml) else DeviceSample(dev, "cuda")
               for dev, idx in self.cuda_index.items()]
        out += [self._cpu(dev, pids) for dev, pids in self.pids.items() if dev not in self.cuda_index]
        return tuple(out)

    def _cuda(self, dev: str, idx: int) -> DeviceSample:
        mem = self._nvml.memory(idx)
        return DeviceSample(dev, "cuda", mem.used_bytes if mem else None, mem.total_bytes if mem else None,
                            self._nvml.utilization_pct(idx))

    def _cpu(self, dev: str, pids: list[int]) -> DeviceSample:
        rss, cpu = self._procs.sample(pids)
        return DeviceSample(dev, "cpu", rss, host_total_bytes(), cpu)

    def close(self) -> None:
        self._nvml.close()
