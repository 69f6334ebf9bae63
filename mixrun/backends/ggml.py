"""ggml's backend registry through ctypes: what llama-cpp-python does not bind.

llama.cpp builds its CPU weight placement list from the CPU device's "extra" buffer types (``make_cpu_buft_list`` in
llama-model.cpp: ``ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)``, then the registry's
``ggml_backend_dev_get_extra_bufts`` proc address, a NULL-terminated array). This module asks the same registry, in
the ggml that llama-cpp-python loaded, so mixrun names the same buffer types llama.cpp will use, and hands llama.cpp
back the same device and buffer-type handles (:mod:`mixrun.backends.llamacpp_overrides`).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Any

# enum ggml_backend_dev_type in ggml-backend.h: CPU, GPU, IGPU (integrated, host memory), ACCEL (BLAS, ...)
GGML_BACKEND_DEVICE_TYPE_CPU = 0
DEVICE_TYPES = ("CPU", "GPU", "IGPU", "ACCEL")
MAX_BUFFER_TYPES = 64


@dataclass(frozen=True)
class GgmlDevice:
    """One device in ggml's registry, in llama.cpp's order. ``handle`` is the ``ggml_backend_dev_t``, ``buffer_types``
    its default buffer type's name first, then its extra ones (``CPU``, ``CPU_REPACK``)."""

    name: str
    kind: str  # DEVICE_TYPES
    handle: int
    buffer_types: tuple[tuple[str, int], ...]


def _libggml(llama_cpp: Any) -> ctypes.CDLL | None:
    """The ggml library next to llama-cpp-python's libllama (already loaded by it; this reopens the same handle)."""
    lib_dir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    for name in ("libggml.so", "libggml.dylib", "ggml.dll"):
        path = os.path.join(lib_dir, name)
        if os.path.exists(path):
            return ctypes.CDLL(path)
    return None


def _bound(llama_cpp: Any) -> ctypes.CDLL | None:
    """libggml with the registry functions' signatures declared; None when the build has no registry."""
    lib = _libggml(llama_cpp)
    if lib is None:
        return None
    ptr, name = ctypes.c_void_p, ctypes.c_char_p
    signatures = {
        "ggml_backend_dev_count": (ctypes.c_size_t, []),
        "ggml_backend_dev_get": (ptr, [ctypes.c_size_t]),
        "ggml_backend_dev_by_type": (ptr, [ctypes.c_int]),
        "ggml_backend_dev_name": (name, [ptr]),
        "ggml_backend_dev_type": (ctypes.c_int, [ptr]),
        "ggml_backend_dev_buffer_type": (ptr, [ptr]),
        "ggml_backend_dev_backend_reg": (ptr, [ptr]),
        "ggml_backend_reg_get_proc_address": (ptr, [ptr, name]),
        "ggml_backend_buft_name": (name, [ptr]),
    }
    try:
        for fn, (restype, argtypes) in signatures.items():
            getattr(lib, fn).restype = restype
            getattr(lib, fn).argtypes = argtypes
    except AttributeError:  # an older ggml without the registry
        return None
    return lib


def _extra_buffer_types(lib: ctypes.CDLL, dev: int) -> list[tuple[str, int]]:
    """A device's extra buffer types, through its registry's ``ggml_backend_dev_get_extra_bufts`` proc address
    (only the CPU backend has one today)."""
    reg = lib.ggml_backend_dev_backend_reg(dev) if dev else None
    fn = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts") if reg else None
    if not fn:
        return []
    bufts = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn)(dev)
    out: list[tuple[str, int]] = []
    while bufts and len(out) < MAX_BUFFER_TYPES and bufts[len(out)]:
        buft = bufts[len(out)]
        out.append((lib.ggml_backend_buft_name(buft).decode(errors="replace"), buft))
    return out


def cpu_extra_buffer_types(llama_cpp: Any) -> list[str] | None:
    """Names of the CPU device's extra buffer types (``["AMX", "CPU_REPACK"]`` on an AMX Xeon, ``["CPU_REPACK"]`` on
    an AVX2 CPU), in llama.cpp's order of preference; None when the build does not say."""
    lib = _bound(llama_cpp)
    if lib is None:
        return None
    return [n for n, _ in _extra_buffer_types(lib, lib.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU))]


def devices(llama_cpp: Any) -> list[GgmlDevice] | None:
    """Every device ggml registered (``ggml_backend_dev_count``/``ggml_backend_dev_get``), with its buffer types;
    None when the build has no registry."""
    lib = _bound(llama_cpp)
    if lib is None:
        return None
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        kind = lib.ggml_backend_dev_type(dev)
        buft = lib.ggml_backend_dev_buffer_type(dev)
        bufts = [(lib.ggml_backend_buft_name(buft).decode(errors="replace"), buft)] if buft else []
        out.append(GgmlDevice(name=lib.ggml_backend_dev_name(dev).decode(errors="replace"),
                              kind=DEVICE_TYPES[kind] if 0 <= kind < len(DEVICE_TYPES) else str(kind), handle=dev,
                              buffer_types=tuple(bufts + _extra_buffer_types(lib, dev))))
    return out
