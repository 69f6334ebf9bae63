"""Tensor overrides and device lists for llama.cpp, through llama-cpp-python, which exposes neither.

What llama.cpp does with them (ggml-org/llama.cpp, read for this module):

- ``llama.h``: ``struct llama_model_params`` starts with ``ggml_backend_dev_t * devices`` ("NULL-terminated list of
  devices to use for offloading (if NULL, all available devices are used)") and ``const struct
  llama_model_tensor_buft_override * tensor_buft_overrides`` ("NULL-terminated list of buffer types to use for
  tensors that match a pattern"), an array of ``{ const char * pattern; ggml_backend_buffer_type_t buft; }`` ended
  by a ``{NULL, NULL}`` entry.
- ``src/llama.cpp`` ``llama_model_load_from_file_impl``: with ``devices`` set, exactly those devices become
  ``model->devices`` (``for (ggml_backend_dev_t * dev = params.devices; *dev; ++dev)``), in that order; without it
  llama.cpp takes every GPU (CPU and ACCEL devices are "handled separately"), RPC servers first. With split mode
  none, ``main_gpu`` indexes this list. Later copies of the same function that have ``LLAMA_SPLIT_MODE_TENSOR``
  wrap the listed devices, and only those, in the one meta device (``ggml_backend_meta_device(params.devices,
  n_devs, ...)``); without a list, tensor mode takes every device whose buffer type is not the CPU's. So the device
  list is how a GPU is left out: an unlisted GPU holds no layers, no KV and joins no all-reduce, where a zero
  ``-ts`` share only gives a listed device no layers. ``llama_model::load_tensors`` (llama-model.cpp) copies
  ``tensor_split`` for ``n_devices()`` entries: ``-ts`` is indexed by position in *this* list, not by the global
  device number.
- ``src/llama-model.cpp`` ``load_tensors``/``create_tensor``: each weight's name is matched against every pattern in
  order with ``std::regex_search`` (the first match wins, partial matches count); a match sets the buffer type,
  except that an override to the plain ``CPU`` buffer type re-selects among the CPU's list, extra buffer types
  first (PR #14990, "when overriding to a CPU buffer, consider the extra buffer types"). Then llama.cpp logs
  ``tensor NAME (N MiB TYPE) buffer type overridden to BUFT`` at debug level. A layer's KV cache and its other
  tensors still follow the ``-ts``/``-ngl`` layer assignment.
- ``common/arg.cpp`` ``parse_tensor_buffer_overrides`` (``-ot/--override-tensor``): buffer types are found by name
  over ``ggml_backend_dev_count``/``ggml_backend_dev_get``/``ggml_backend_dev_buffer_type``, each value is split on
  ``,`` and then at the first ``=`` into pattern and buffer type, an unknown name prints the known ones and throws,
  and the pattern strings are kept alive in a static list. That version of llama-server knows only the devices'
  default buffer types (``CPU``, ``CUDA0``), so its ``-ot`` refuses ``CPU_REPACK``; mixrun also finds the CPU's
  extra ones (``CPU_REPACK``, ``AMX``) through the registry's ``ggml_backend_dev_get_extra_bufts``
  (:mod:`mixrun.backends.ggml`), which llama.cpp itself accepts in the params.
  ``parse_device_list`` (``--device``): names are split on ``,``, looked up with ``ggml_backend_dev_by_name``
  (case-insensitive), a CPU device is an "invalid device", ``none`` alone means the empty list, NULL-terminated.

llama-cpp-python 0.3.36 declares both fields as ``c_void_p`` ("NOTE: unused"), and ``Llama()`` builds its parameters
from ``llama_model_default_params()`` (llama-cpp-python PR #2007, which would expose overrides, is still open). So
:func:`placement` builds the two arrays here, :mod:`mixrun.backends.llamacpp_load` writes their addresses into the
parameters, and the :class:`Placement` that owns them must live as long as the model: llama.cpp keeps the params
(``llama_model::params``) and llama-cpp-python keeps its copy beside the model.

An override to a CPU extra buffer type forces the tensor there whether that buffer can hold its type or not: on
this CPU (AVX-512, llama.cpp with ggml 0.25.3), ``ffn_.*=CPU_REPACK`` on a Q4_1 model dies with SIGSEGV in the load,
where a Q4_0 one repacks fine. ``CPU`` is the safe way to put weights on the host: llama.cpp then picks the
extra buffer type itself where the tensor's type allows it.
"""

from __future__ import annotations

import ctypes
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mixrun.backends import ggml
from mixrun.errors import MixrunError

BUILT_AGAINST = "0.3.36"  # the llama-cpp-python whose llama_model_params layout _ExpectedParams mirrors


class TensorBuftOverride(ctypes.Structure):
    """``struct llama_model_tensor_buft_override`` (llama.h); the binding leaves it undeclared."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


class _ExpectedParams(ctypes.Structure):
    """``struct llama_model_params`` as llama-cpp-python 0.3.36 declares it (llama.h of its vendored llama.cpp)."""

    _fields_ = [
        ("devices", ctypes.c_void_p),
        ("tensor_buft_overrides", ctypes.c_void_p),
        ("n_gpu_layers", ctypes.c_int32),
        ("split_mode", ctypes.c_int),
        ("load_mode", ctypes.c_int),
        ("lazy_mode", ctypes.c_int),
        ("main_gpu", ctypes.c_int32),
        ("tensor_split", ctypes.c_void_p),
        ("progress_callback", ctypes.c_void_p),
        ("progress_callback_user_data", ctypes.c_void_p),
        ("kv_overrides", ctypes.c_void_p),
        ("vocab_only", ctypes.c_bool),
        ("check_tensors", ctypes.c_bool),
        ("use_extra_bufts", ctypes.c_bool),
        ("no_host", ctypes.c_bool),
        ("no_alloc", ctypes.c_bool),
        ("load_mtp", ctypes.c_bool),
    ]


WRITTEN = ("devices", "tensor_buft_overrides")  # the fields this module writes; both pointers


@dataclass(frozen=True)
class TensorOverride:
    """One ``-ot`` entry: tensors whose name ``pattern`` matches (``std::regex_search``) go to buffer type
    ``buffer`` (a ggml buffer type name: ``CPU``, ``CUDA0``, ``CPU_REPACK``)."""

    pattern: str
    buffer: str

    @property
    def spec(self) -> str:
        return f"{self.pattern}={self.buffer}"


def parse_override(spec: str) -> TensorOverride:
    """``"REGEX=BUFFER"`` (llama-server's ``-ot`` syntax) -> a :class:`TensorOverride`; a one-line MixrunError naming
    the spec when llama-server would not read it the same way or the pattern is not a regular expression."""
    if not isinstance(spec, str):
        raise MixrunError(f"--override-tensor {spec!r}: expected a \"REGEX=BUFFER\" string")
    # llama-server splits the value at the first '=' and the whole -ot value on ','
    pattern, eq, buffer = spec.partition("=")
    if not eq or not pattern or not buffer:
        raise MixrunError(f"--override-tensor {spec!r}: expected \"REGEX=BUFFER\", e.g. \"blk\\.0\\.=CPU\"")
    if "," in spec:
        raise MixrunError(f"--override-tensor {spec!r}: llama-server splits -ot values at commas; "
                          "write a comma in the pattern as \\x2c")
    try:
        re.compile(pattern)
    except re.error as e:
        raise MixrunError(f"--override-tensor {spec!r}: not a regular expression ({e})") from None
    return TensorOverride(pattern, buffer)


def parse_overrides(specs: Sequence[str] | None) -> tuple[TensorOverride, ...]:
    """A list of ``"REGEX=BUFFER"`` strings, in order (llama.cpp applies the first that matches)."""
    if specs is None:
        return ()
    if isinstance(specs, str):  # one spec, not its characters
        specs = [specs]
    return tuple(parse_override(s) for s in specs)


def parse_devices(names: Sequence[str] | None) -> tuple[str, ...] | None:
    """A device-name list as llama-server's ``--device`` reads it: None is llama.cpp's default (every GPU), ``[]``
    or ``["none"]`` no offload device at all."""
    if names is None:
        return None
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    names = tuple(names)
    if names == ("none",):
        return ()
    for n in names:
        if not isinstance(n, str) or not n or "," in n or n == "none":
            raise MixrunError(f"--device {n!r}: expected a llama.cpp device name such as CUDA0")
    if len(set(n.lower() for n in names)) != len(names):
        raise MixrunError(f"--device {','.join(names)}: a device is listed twice")
    return names


def server_args(overrides: Sequence[str | TensorOverride] = (), devices: Sequence[str] | None = None) -> list[str]:
    """The same choices as llama-server arguments: ``-ot REGEX=BUF`` per override, ``--device A,B`` (``none`` for an
    empty list). Pure: names are not checked against this machine."""
    args: list[str] = []
    for o in overrides:
        args += ["-ot", (o if isinstance(o, TensorOverride) else parse_override(o)).spec]
    devs = parse_devices(devices)
    if devs is not None:
        args += ["--device", ",".join(devs) if devs else "none"]
    return args


def server_flags(overrides: Sequence[str | TensorOverride] = (), devices: Sequence[str] | None = None) -> str:
    """:func:`server_args` as shell text (POSIX quoting: ``-ot 'blk\\.0\\.=CPU'``)."""
    return shlex.join(server_args(overrides, devices))


def check_layout(llama_cpp: Any) -> None:
    """Refuse, in one line, a binding whose ``llama_model_params`` is not the layout mixrun writes into: the field
    names and order, the types of the fields written, and the struct's size."""
    params = llama_cpp.llama_cpp.llama_model_params
    version = getattr(llama_cpp, "__version__", "?")
    fields = list(getattr(params, "_fields_", []))
    names = tuple(f[0] for f in fields)
    expected = tuple(f[0] for f in _ExpectedParams._fields_)
    problem = None
    if names != expected:
        i = next(i for i in range(len(names) + 1) if i == len(names) or i == len(expected) or names[i] != expected[i])
        if i < len(names) and i < len(expected):
            problem = f"field {i} is {names[i]}, not {expected[i]}"
        else:
            problem = f"no field {i} ({expected[i]})" if i < len(expected) else f"an extra field {names[i]}"
    else:
        types = dict((f[0], f[1]) for f in fields)
        wrong = [n for n in WRITTEN if types[n] is not ctypes.c_void_p]
        if wrong:
            problem = f"{wrong[0]} declared as {getattr(types[wrong[0]], '__name__', types[wrong[0]])}"
        elif ctypes.sizeof(params) != ctypes.sizeof(_ExpectedParams):
            problem = f"{ctypes.sizeof(params)} bytes, not {ctypes.sizeof(_ExpectedParams)}"
    if problem:
        raise MixrunError(f"llama.cpp: llama-cpp-python {version}'s llama_model_params is not the layout mixrun "
                          f"writes tensor overrides and devices into ({problem}); they need llama-cpp-python "
                          f"{BUILT_AGAINST}")


def buffer_types(llama_cpp: Any) -> dict[str, int]:
    """Buffer type name -> ``ggml_backend_buffer_type_t``, over every device's default and extra buffer types, in
    llama.cpp's device order."""
    devs = ggml.devices(llama_cpp)
    if devs is None:
        raise MixrunError("llama.cpp: this llama-cpp-python's ggml has no backend registry to find buffer types in")
    found: dict[str, int] = {}
    for d in devs:
        for name, handle in d.buffer_types:
            found.setdefault(name, handle)
    return found


@dataclass
class Placement:
    """The ctypes objects llama.cpp points into for one model, and where they point. Keep it as long as the model:
    the pattern bytes and both arrays are owned here, not by llama.cpp."""

    overrides: tuple[TensorOverride, ...] = ()
    devices: tuple[str, ...] | None = None
    patterns: list[bytes] = field(default_factory=list, repr=False)
    override_array: ctypes.Array | None = field(default=None, repr=False)
    device_array: ctypes.Array | None = field(default=None, repr=False)

    def apply(self, params: Any) -> None:
        """Point ``params`` (a ``llama_model_params``) at the arrays; fields left None keep llama.cpp's default."""
        if self.override_array is not None:
            params.tensor_buft_overrides = ctypes.addressof(self.override_array)
        if self.device_array is not None:
            params.devices = ctypes.addressof(self.device_array)

    def server_args(self) -> list[str]:
        return server_args(self.overrides, self.devices)


def placement(llama_cpp: Any, overrides: Sequence[str] | None = None,
              devices: Sequence[str] | None = None) -> Placement:
    """Resolve override specs and device names against the ggml llama-cpp-python loaded and build llama.cpp's
    NULL-terminated arrays. One-line MixrunError for a bad spec, an unknown buffer type or device (listing the
    known ones), or a binding whose struct layout differs from the one this module writes into."""
    ots = parse_overrides(overrides)
    devs = parse_devices(devices)
    result = Placement(overrides=ots, devices=devs)
    if not ots and devs is None:
        return result
    check_layout(llama_cpp)
    if ots:
        known = buffer_types(llama_cpp)
        result.override_array = (TensorBuftOverride * (len(ots) + 1))()  # zeroed: the last entry is {NULL, NULL}
        for i, o in enumerate(ots):
            if o.buffer not in known:
                raise MixrunError(f"--override-tensor {o.spec!r}: unknown buffer type {o.buffer} "
                                  f"(this llama.cpp has {', '.join(known) or 'none'})")
            result.patterns.append(o.pattern.encode())
            result.override_array[i].pattern = result.patterns[-1]
            result.override_array[i].buft = known[o.buffer]
    if devs is not None:
        registered = ggml.devices(llama_cpp) or []
        offload = [d for d in registered if d.kind != "CPU"]
        result.device_array = (ctypes.c_void_p * (len(devs) + 1))()  # zeroed: NULL-terminated
        for i, name in enumerate(devs):
            dev = next((d for d in registered if d.name.lower() == name.lower()), None)
            if dev is None or dev.kind == "CPU":
                why = "the CPU is not an offload device" if dev else "unknown device"
                raise MixrunError(f"--device {name}: {why} (this llama.cpp has "
                                  f"{', '.join(d.name for d in offload) or 'no GPU devices'})")
            result.device_array[i] = dev.handle
    return result
