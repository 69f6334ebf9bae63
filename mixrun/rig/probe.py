"""This machine's hardware now, read through one wrapper: NVML (nvidia-ml-py) for NVIDIA GPUs, psutil for the host's
memory, cores and processes. Discovery, the launch preflight and the telemetry sampler all read through here.

Nothing here raises because a library or driver is missing: NVML that cannot start is an :class:`Nvml` whose
``lib`` is None and whose ``why`` says why; a metric a GPU or process does not give is ``None``. Bytes are ints.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, MutableMapping
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
    GPUs are numbered as NVML numbers them (physical order, not ``CUDA_VISIBLE_DEVICES``);
    :meth:`cuda_to_nvml` maps CUDA's numbering to it.
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

    def uuid(self, index: int) -> str | None:
        """GPU ``index``'s UUID (``GPU-…``), lowercase."""
        u = self._query(index, lambda h: self.lib.nvmlDeviceGetUUID(h))
        return None if u is None else (u.decode() if isinstance(u, bytes) else str(u)).strip().lower()

    def bus_id(self, index: int) -> str | None:
        """GPU ``index``'s PCI bus id, as ``0000:01:00.0``."""
        info = self._query(index, lambda h: self.lib.nvmlDeviceGetPciInfo(h))
        raw = getattr(info, "busId", None) if info is not None else None
        return None if raw is None else normalize_bus_id(raw)

    def cuda_to_nvml(self, env: Mapping[str, str] | None = None) -> list[int]:
        """The NVML index of each CUDA device, in CUDA's numbering (entry k is ``cuda:k``, llama.cpp's ``CUDAk``).

        CUDA numbers the GPUs ``CUDA_VISIBLE_DEVICES`` lists, in its order: indices, or UUIDs (``GPU-…``, a unique
        prefix is enough); the list ends at the first entry that names no GPU, as CUDA's does. Unset, every GPU.
        Indices count in PCI bus order, NVML's, which is CUDA's under ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
        (:func:`cuda_order_env` sets it for mixrun's launches)."""
        env = os.environ if env is None else env
        n = self.count()
        raw = env.get("CUDA_VISIBLE_DEVICES")
        if raw is None:
            return list(range(n))
        uuids: list[str | None] | None = None
        out: list[int] = []
        for entry in (e.strip().lower() for e in raw.split(",")):
            if entry.lstrip("-").isdigit():
                i = int(entry)
                if not 0 <= i < n or i in out:
                    break
                out.append(i)
                continue
            if uuids is None:
                uuids = [self.uuid(i) for i in range(n)]
            match = [i for i, u in enumerate(uuids) if u and entry and u.startswith(entry)]
            if len(match) != 1 or match[0] in out:  # MIG instances, unknown or ambiguous: CUDA stops there
                break
            out.append(match[0])
        return out

    def utilization_pct(self, index: int) -> float | None:
        """GPU ``index``'s utilization over NVML's last sample period, 0-100."""
        util = self._query(index, lambda h: self.lib.nvmlDeviceGetUtilizationRates(h))
        return None if util is None else float(util.gpu)


def normalize_bus_id(bus_id: str | bytes) -> str:
    """``00000000:01:00.0`` (NVML) and ``0000:01:00.0`` (CUDA) -> ``0000:01:00.0``."""
    if isinstance(bus_id, bytes):
        bus_id = bus_id.decode()
    bus_id = bus_id.strip().lower()
    if bus_id.count(":") == 2:
        dom, bus, devfn = bus_id.split(":")
        return f"{int(dom, 16):04x}:{bus}:{devfn}"
    return bus_id


def cuda_order_env(env: MutableMapping[str, str] | None = None) -> None:
    """Have CUDA number GPUs as NVML, ``nvidia-smi`` and ``mixrun profile detect`` do, by PCI bus, unless the user
    chose an order: CUDA's default is fastest first, which on a rig of unlike cards (a 3090 beside a 3060) is not
    the bus order, and a plan's split would land on the wrong cards. Call before CUDA initialises (llama.cpp or
    torch); rank processes inherit it."""
    env = os.environ if env is None else env
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")


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
