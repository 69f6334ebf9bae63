"""This machine's hardware now, read through one wrapper: NVML (nvidia-ml-py) for NVIDIA GPUs, psutil for the host's
memory, cores and processes. Discovery, the launch preflight and the telemetry sampler all read through here.

Nothing here raises because a library or driver is missing: NVML that cannot start is an :class:`Nvml` whose
``lib`` is None and whose ``why`` says why; a metric a GPU or process does not give is ``None``. Bytes are ints.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GpuMemory:
    """One GPU's memory as NVML reports it, in bytes."""

    used_bytes: int
    total_bytes: int


class Nvml:
    """One NVML session: ``with Nvml() as nv:`` initialises NVML and shuts it down on exit; a long-lived reader
    calls :meth:`open` and :meth:`close` itself.

    ``module`` is the NVML module to use instead of importing ``pynvml`` (tests pass a double). While open, ``lib``
    is the initialised module, or None when there is no library or driver (``why`` then says so, for the user).
    GPUs are numbered as NVML numbers them (physical order, not ``CUDA_VISIBLE_DEVICES``).
    """

    def __init__(self, module: Any = None) -> None:
        self._module = module
        self.lib: Any = None
        self.why: str | None = None

    def open(self) -> Nvml:
        module = self._module
        if module is None:
            try:
                import pynvml as module
            except ImportError:
                self.why = "nvidia-ml-py is not installed: no NVIDIA GPUs looked for"
                return self
        try:
            module.nvmlInit()
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self.why = f"no NVIDIA GPU found (NVML: {e or type(e).__name__})"
            return self
        self.lib, self.why = module, None
        return self

    def close(self) -> None:
        if self.lib is not None:
            with contextlib.suppress(Exception):
                self.lib.nvmlShutdown()
            self.lib = None

    def __enter__(self) -> Nvml:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def count(self) -> int:
        """How many GPUs NVML sees (0 without NVML)."""
        if self.lib is None:
            return 0
        try:
            return int(self.lib.nvmlDeviceGetCount())
        except Exception:
            return 0

    def handle(self, index: int) -> Any:
        """NVML's handle of GPU ``index``, or None."""
        if self.lib is None:
            return None
        try:
            return self.lib.nvmlDeviceGetHandleByIndex(index)
        except Exception:
            return None

    def _query(self, index: int, read: Callable[[Any], Any]) -> Any:
        h = self.handle(index)
        if h is None:
            return None
        try:
            return read(h)
        except Exception:  # NVMLError_NotSupported and friends for metrics a GPU lacks
            return None

    def memory(self, index: int) -> GpuMemory | None:
        """Used and total memory of GPU ``index``."""
        mem = self._query(index, lambda h: self.lib.nvmlDeviceGetMemoryInfo(h))
        return None if mem is None else GpuMemory(int(mem.used), int(mem.total))

    def free_bytes(self) -> list[int | None]:
        """Free memory now of every GPU, in NVML order (None where NVML cannot say)."""
        out: list[int | None] = []
        for i in range(self.count()):
            mem = self._query(i, lambda h: self.lib.nvmlDeviceGetMemoryInfo(h))
            out.append(None if mem is None else int(mem.free))
        return out

    def utilization_pct(self, index: int) -> float | None:
        """GPU ``index``'s utilization over NVML's last sample period, 0-100."""
        util = self._query(index, lambda h: self.lib.nvmlDeviceGetUtilizationRates(h))
        return None if util is None else float(util.gpu)


# ---- the CPU host --------------------------------------------------------------------------------------------------


def host_total_bytes() -> int:
    """This host's physical memory."""
    import psutil

    return int(psutil.virtual_memory().total)


def host_available_bytes() -> int:
    """Memory a new program can have now without swapping (the OS's "available")."""
    import psutil

    return int(psutil.virtual_memory().available)


def host_cores() -> int:
    """Physical CPU cores (logical ones where the OS does not say)."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


@dataclass
class ProcessMeter:
    """Resident memory and CPU use of processes, summed: the figures of a CPU device run by those processes.

    CPU use is measured between two calls (psutil's ``cpu_percent``), so the meter keeps each process it has seen."""

    _procs: dict[int, Any] = field(default_factory=dict)

    def sample(self, pids: list[int]) -> tuple[int, float]:
        """(resident bytes, CPU percent of one core, summed) of ``pids``; a process that has ended counts nothing."""
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
        return rss, cpu
