"""Loading a model into llama.cpp: a progress bar, Ctrl-C during the load, and the model parameters
llama-cpp-python does not expose (the progress callback, llama.cpp's repacked CPU weights, tensor overrides and the
device list: :mod:`mixrun.backends.llamacpp_overrides`).

The llama.cpp backend loads through these; so do tests and benchmarks that load llama.cpp the way mixrun does.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from mixrun.backends.llamacpp_cpu import LlamaCppCpuError
from mixrun.backends.llamacpp_overrides import Placement, placement


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
def llama_params(llama_cpp: Any, progress: LoadProgress | None = None, *, extra_buffers: bool = True,
                 overrides: Sequence[str] | None = None, devices: Sequence[str] | None = None) -> Iterator[Placement]:
    """Make the next ``llama_cpp.Llama(...)`` report load progress to ``progress``, use llama.cpp's CPU extra buffer
    types (repacked weights) or not, place tensors by ``overrides`` (``"REGEX=BUFFER"``, llama-server's ``-ot``) and
    offload only to ``devices`` (llama.cpp device names, llama-server's ``--device``; None: every GPU).

    llama-cpp-python builds its model parameters from ``llama_model_default_params()`` and exposes none of these
    knobs, so the defaults are wrapped for the duration of the call. Yields the :class:`Placement` that owns the
    arrays llama.cpp points into: the caller keeps it as long as the model. Bad specs, unknown names and a binding
    whose struct differs are refused before anything loads.
    """
    low = llama_cpp.llama_cpp
    original = low.llama_model_default_params
    names = {name for name, _ in low.llama_model_params._fields_}
    if not extra_buffers and "use_extra_bufts" not in names:
        raise LlamaCppCpuError(f"llama.cpp: llama-cpp-python {llama_cpp.__version__} cannot turn off the repacked CPU "
                               "weights that crash on this CPU: pip install -U llama-cpp-python")
    placed = placement(llama_cpp, overrides, devices)
    callback = low.llama_progress_callback(progress) if progress is not None else None

    def with_params() -> Any:
        params = original()
        if callback is not None:
            params.progress_callback = callback
        if "use_extra_bufts" in names:
            params.use_extra_bufts = extra_buffers
        placed.apply(params)
        return params

    low.llama_model_default_params = with_params
    try:
        yield placed
    finally:
        low.llama_model_default_params = original
