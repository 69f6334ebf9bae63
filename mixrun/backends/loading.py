"""Before and during a load: re-check a plan against the memory free now, show progress, let Ctrl-C abort.

The planner works from the profile's capacities; by the time a model loads, other programs may hold memory. The
preflight check compares each planned device's bytes with what is free on this machine now (NVML for GPUs, the
OS's available memory for the CPU host) and refuses with the planner's figures when it will not fit.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mixrun.errors import MixrunError


@dataclass(frozen=True)
class FreeNow:
    """Free bytes now per planned device id; devices of the plan this machine does not have are listed apart."""

    free_bytes: dict[str, int]
    absent: tuple[str, ...]


def free_memory(profile: Any, plan: Any, nvml: Any = None) -> FreeNow:
    """Free bytes of the plan's devices on this machine. CUDA devices of the profile map to local GPUs by their
    order on the first host (the order llama.cpp and torch number them); a device past the local count is absent."""
    import psutil

    first = profile.host_of(profile.devices[0])
    gpus = [d.id for d in profile.devices if d.backend != "cpu" and profile.host_of(d) == first]
    planned = [d.id for d in plan.devices]
    local: list[int] = []
    if any(p in gpus for p in planned):
        local = _nvml_free(nvml)
    free, absent = {}, []
    for dev_id in planned:
        dev = profile.device(dev_id)
        if dev.backend == "cpu":
            free[dev_id] = int(psutil.virtual_memory().available)
        elif dev_id in gpus and gpus.index(dev_id) < len(local):
            free[dev_id] = local[gpus.index(dev_id)]
        else:
            absent.append(dev_id)
    return FreeNow(free, tuple(absent))


def _nvml_free(nvml: Any = None) -> list[int]:
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return []
    try:
        nvml.nvmlInit()
    except Exception:  # no driver: no GPUs here
        return []
    try:
        return [int(nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(i)).free)
                for i in range(nvml.nvmlDeviceGetCount())]
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def preflight(profile: Any, plan: Any, *, force: bool = False, nvml: Any = None,
              warn: Callable[[str], None] = lambda m: None) -> list[str]:
    """Refuse a plan that does not fit the memory free now (``force`` turns the refusal into a warning).

    Returns notes for the user (devices of the plan that are not on this machine). When none of the plan's GPUs is
    here the whole model runs in host memory, so the sum of the plan is checked against the host's free memory.
    """
    import psutil

    now = free_memory(profile, plan, nvml)
    notes, short = [], []
    for use in plan.devices:
        if use.id in now.free_bytes and use.total_bytes > now.free_bytes[use.id]:
            short.append(f"{use.id} needs {use.total_bytes / 2**30:.2f} GiB, "
                         f"{now.free_bytes[use.id] / 2**30:.2f} GiB free now")
    if now.absent:
        notes.append(f"{', '.join(now.absent)} of {profile.name} not found on this machine: running on what is here")
        if not any(d for d in now.free_bytes if profile.device(d).backend != "cpu"):
            need = sum(u.weights_bytes + u.kv_bytes + u.compute_bytes for u in plan.devices)
            avail = int(psutil.virtual_memory().available)
            if need > avail:
                short.append(f"this machine's memory: needs {need / 2**30:.2f} GiB, {avail / 2**30:.2f} GiB free now")
    if short:
        msg = "does not fit the memory free now: " + "; ".join(short)
        if not force:
            raise MixrunError(msg + "; --force loads it anyway")
        warn(msg)
    return notes


class LoadProgress:
    """A llama.cpp load-progress callback: draws a bar on a terminal once loading takes a while, and aborts the load
    (the callback returns false) after Ctrl-C, which is caught here because a ctypes callback cannot raise."""

    def __init__(self, name: str, out: Any = None, delay_s: float = 0.5) -> None:
        self.name, self.out, self.delay_s = name, out if out is not None else sys.stderr, delay_s
        self.interrupted = False
        self.fraction = 0.0
        self._t0 = time.monotonic()
        self._drawn = False

    def __call__(self, fraction: float, _user_data: Any = None) -> bool:
        self.fraction = fraction
        if not self.interrupted and self.out.isatty() and time.monotonic() - self._t0 >= self.delay_s:
            width = 30
            filled = int(width * min(max(fraction, 0.0), 1.0))
            self.out.write(f"\r\x1b[2mloading {self.name} [{'#' * filled}{'.' * (width - filled)}] "
                           f"{fraction:4.0%}\x1b[0m")
            self.out.flush()
            self._drawn = True
        return not self.interrupted

    def finish(self) -> None:
        if self._drawn:
            self.out.write("\r\x1b[2K")
            self.out.flush()


@contextlib.contextmanager
def interruptible(progress: LoadProgress) -> Iterator[None]:
    """While a C load runs, turn SIGINT into ``progress.interrupted`` (read by the callback); afterwards raise
    KeyboardInterrupt if it came. Only the main thread can own signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.getsignal(signal.SIGINT)

    def on_sigint(signum: int, frame: Any) -> None:
        progress.interrupted = True

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        progress.finish()
    if progress.interrupted:
        raise KeyboardInterrupt


@contextlib.contextmanager
def llama_params(llama_cpp: Any, progress: LoadProgress | None = None, *, extra_buffers: bool = True) -> Iterator[None]:
    """Make the next ``llama_cpp.Llama(...)`` report load progress to ``progress`` and use llama.cpp's CPU extra
    buffer types (repacked weights) or not.

    llama-cpp-python builds its model parameters from ``llama_model_default_params()`` and exposes neither knob, so
    the defaults are wrapped for the duration of the call.
    """
    from mixrun.backends.llamacpp_cpu import LlamaCppCpuError

    low = llama_cpp.llama_cpp
    original = low.llama_model_default_params
    names = {name for name, _ in low.llama_model_params._fields_}
    if not extra_buffers and "use_extra_bufts" not in names:
        raise LlamaCppCpuError(f"llama.cpp: llama-cpp-python {llama_cpp.__version__} cannot turn off the repacked CPU "
                               "weights that crash on this CPU: pip install -U llama-cpp-python")
    callback = low.llama_progress_callback(progress) if progress is not None else None

    def with_params() -> Any:
        params = original()
        if callback is not None:
            params.progress_callback = callback
        if "use_extra_bufts" in names:
            params.use_extra_bufts = extra_buffers
        return params

    low.llama_model_default_params = with_params
    try:
        yield
    finally:
        low.llama_model_default_params = original
