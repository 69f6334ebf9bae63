"""ggml's backend registry through ctypes: what llama-cpp-python does not bind.

llama.cpp builds its CPU weight placement list from the CPU device's "extra" buffer types (``make_cpu_buft_list`` in
llama-model.cpp: ``ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)``, then the registry's
``ggml_backend_dev_get_extra_bufts`` proc address, a NULL-terminated array). This module asks the same registry, in
the ggml that llama-cpp-python loaded, so mixrun names the same buffer types llama.cpp will use.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

GGML_BACKEND_DEVICE_TYPE_CPU = 0  # enum ggml_backend_dev_type in ggml-backend.h
MAX_BUFFER_TYPES = 64


def _libggml(llama_cpp: Any) -> ctypes.CDLL | None:
    """The ggml library next to llama-cpp-python's libllama (already loaded by it; this reopens the same handle)."""
    lib_dir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    for name in ("libggml.so", "libggml.dylib", "ggml.dll"):
        path = os.path.join(lib_dir, name)
        if os.path.exists(path):
            return ctypes.CDLL(path)
    return None


def cpu_extra_buffer_types(llama_cpp: Any) -> list[str] | None:
    """Names of the CPU device's extra buffer types (``["AMX", "CPU_REPACK"]`` on an AMX Xeon, ``["CPU_REPACK"]`` on
    an AVX2 CPU), in llama.cpp's order of preference; None when the build does not say."""
    lib = _libggml(llama_cpp)
    if lib is None:
        return None
    try:
        lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p
        lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
        lib.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
        lib.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
        lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.ggml_backend_buft_name.restype = ctypes.c_char_p
        lib.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    except AttributeError:  # an older ggml without the registry
        return None
    dev = lib.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    reg = lib.ggml_backend_dev_backend_reg(dev) if dev else None
    fn = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts") if reg else None
    if not fn:
        return []
    bufts = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn)(dev)
    names: list[str] = []
    while bufts and len(names) < MAX_BUFFER_TYPES and bufts[len(names)]:
        names.append(lib.ggml_backend_buft_name(bufts[len(names)]).decode(errors="replace"))
    return names
