"""Ground-truth buffer sizes from llama.cpp itself (CPU only), to check the planner's memory predictions against.

Usage: python benchmarks/llamacpp_memory.py [--json] [--out FILE] [--exact] [--check-no-alloc] [--shapes]
           [--no-alloc] [--extra-bufts on|off|both] [--models NAME ...] [--n-ctx N ...] [--n-ubatch N ...] [--quick]
benchmarks/llamacpp_memory_results.json was written with ``--exact --check-no-alloc --shapes --json --out``.

``llamacpp_buffers()`` loads a GGUF with ``llama_cpp.Llama(..., n_gpu_layers=0, verbose=True)`` in a child
process (so the C-side log is captured whole and the memory goes back to the OS) and parses llama.cpp's own
load-time log into bytes. The log lines this reads (llama-cpp-python 0.3.36; older spellings also accepted):

    load_tensors:   CPU_Mapped model buffer size =    92.10 MiB         (one line per weight buffer type)
    llama_context:        CPU  output buffer size =     0.19 MiB
    llama_kv_cache_iswa: creating     SWA KV cache, size = 512 cells    (only for sliding-window models)
    llama_kv_cache:        CPU KV buffer size =    11.25 MiB            (what was allocated; 0 with no_alloc)
    llama_kv_cache: size =   11.25 MiB (   512 cells,  30 layers,  1/1 seqs), K (f16):    5.62 MiB, V (f16):    5.62 MiB
    sched_reserve:        CPU compute buffer size =    98.25 MiB
    ~llama_context:        CPU compute buffer size is  98.2520 MiB, matches expectation of  98.2520 MiB

Sizes are printed in MiB with 2 decimals, so a value parsed from them is good to +-LOG_PRECISION_BYTES (0.005 MiB)
per line summed (a sliding-window model logs two KV caches); the compute size printed by the context's destructor
has 4 decimals (+-53 bytes).

``exact=True`` also asks llama.cpp for its own per-buffer-type byte counts through ``llama_get_memory_breakdown``,
the function ``llama-server --fit`` uses. It is C++ (``src/llama-ext.h``, a staging header, not in ``llama.h``), so
this compiles a small C++ shim with an ``extern "C"`` entry against the wheel's headers (``g++``); the keys are ``exact_model``,
``exact_context`` (the KV cache, not the output buffer) and ``exact_compute``.

``extra_buffers=False`` loads with ``llama_model_params.use_extra_bufts = false`` (llama.cpp's ``--no-repack``): no
``CPU_REPACK``/``AMX`` buffer, every weight in ``CPU_Mapped``. With them on (llama.cpp's default) the report has one
line per extra buffer type beside the mapped one, e.g. ``CPU_REPACK model buffer size = 2.79 MiB``.

``no_alloc=True`` projects instead of allocating: the model is opened with ``llama_model_params.no_alloc`` (with
``load_mode`` NONE, as ``--fit`` does; mmap asserts) so no weight, KV or compute memory is taken, and the
compute size llama.cpp logs is the one it would allocate. The weight buffer is then logged as 0.00 MiB; use
``model_size`` (``llama_model_size``, exact) or ``exact_model`` instead.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MiB = 2**20
LOG_PRECISION_BYTES = int(round(0.005 * MiB))  # half a unit of the log's second decimal
LOG_PRECISION_BYTES_4DP = int(round(0.00005 * MiB))
KV_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")
_MARK = "@@llamacpp_memory@@ "
_HERE = Path(__file__).resolve().parent


class LlamaCppLoadError(RuntimeError):
    """llama.cpp refused the model or the context; ``log_tail`` holds the lines that say why."""

    def __init__(self, message: str, log_tail: str = ""):
        super().__init__(message)
        self.log_tail = log_tail


def ggml_type(name: str) -> int:
    """llama_cpp's GGML_TYPE_* constant for a KV cache type name (f16, q8_0, q4_0, ...)."""
    import llama_cpp

    if name.lower() not in KV_TYPES:
        raise ValueError(f"unknown KV cache type {name!r}; expected one of {', '.join(KV_TYPES)}")
    return int(getattr(llama_cpp, f"GGML_TYPE_{name.upper()}"))


# --- log parsing ---------------------------------------------------------------------------------------------

_NUM = r"([0-9]+(?:\.[0-9]+)?)"
_RE_MODEL_BUF = re.compile(rf"^(?:load_tensors|llm_load_tensors):\s+(\S+)(?: model)? buffer size =\s*{_NUM} MiB")
_RE_OUTPUT_BUF = re.compile(rf"^\w+:\s+(\S+)\s+output buffer size =\s*{_NUM} MiB")
_RE_KV_BUF = re.compile(rf"^\w+:\s+(\S+) KV buffer size =\s*{_NUM} MiB")
_RE_KV_SIZE = re.compile(  # current: "llama_kv_cache: size = ..."; older: "llama_kv_cache_unified: ..." / "KV self size"
    rf"(?:^\w+: size =|KV self size\s*=)\s*{_NUM} MiB"
    rf"(?:\s*\(\s*(\d+) cells,\s*(\d+) layers,[^)]*\))?"
    rf"(?:,\s*K \((\w+)\):\s*{_NUM} MiB)?(?:,\s*V \((\w+)\):\s*{_NUM} MiB)?"
)
_RE_ISWA = re.compile(r"creating\s+(non-SWA|SWA) KV cache, size = (\d+) cells")
_RE_COMPUTE = re.compile(rf"^\w+:\s+(\S+) compute buffer size =\s*{_NUM} MiB")
_RE_COMPUTE_4DP = re.compile(rf"^~\w+:\s+(\S+) compute buffer size is\s*{_NUM} MiB")
_RE_CTX = re.compile(r"^llama_context: (n_ctx|n_ctx_seq|n_batch|n_ubatch|n_seq_max)\s*=\s*(\d+)")
_RE_FA = re.compile(r"^llama_context: flash_attn\s*=\s*(\w+)")
_HPARAMS = ("n_ctx_train", "n_embd", "n_layer", "n_head", "n_head_kv", "n_embd_head_k", "n_embd_head_v",
            "n_ff", "n_swa", "n_vocab")
_RE_HP = re.compile(rf"^print_info: ({'|'.join(_HPARAMS)})\s*=\s*(\d+)\s*$")


def _mib(text: str) -> int:
    return int(round(float(text) * MiB))


def parse_log(log: str) -> dict[str, int]:
    """Bytes (and a few counts) from a llama.cpp load log; see the module docstring for the lines read.

    Keys: ``weights`` (all model buffers) and ``weights_<buffer type>``; ``kv`` (all KV caches), ``kv_k``, ``kv_v``,
    ``kv_cells``, ``kv_layers`` and, for sliding-window models, ``kv_swa``, ``kv_swa_cells``, ``kv_swa_layers`` (the
    SWA part, also counted in ``kv``); ``kv_buffer`` (KV actually allocated); ``compute`` and ``compute_4dp``;
    ``output``; ``n_ctx``, ``n_ctx_seq``, ``n_batch``, ``n_ubatch``, ``n_seq_max``, ``flash_attn`` (0/1) as the
    context resolved them; ``hp_<name>`` for the hyperparameters llama.cpp printed.
    """
    out: dict[str, int] = {}

    def add(key: str, value: int) -> None:
        out[key] = out.get(key, 0) + value

    pending_swa: bool | None = None
    for line in log.splitlines():
        line = line.rstrip()
        if m := _RE_MODEL_BUF.search(line):
            add("weights", _mib(m[2]))
            add(f"weights_{m[1]}", _mib(m[2]))
        elif m := _RE_OUTPUT_BUF.search(line):
            add("output", _mib(m[2]))
        elif m := _RE_KV_BUF.search(line):
            add("kv_buffer", _mib(m[2]))
        elif m := _RE_ISWA.search(line):
            pending_swa = m[1] == "SWA"
        elif m := _RE_KV_SIZE.search(line):
            size = _mib(m[1])
            add("kv", size)
            if m[4]:
                add("kv_k", _mib(m[5]))
            if m[6]:
                add("kv_v", _mib(m[7]))
            prefix = "kv_swa" if pending_swa else "kv"
            if pending_swa:
                add("kv_swa", size)
            if m[2]:
                out[f"{prefix}_cells"] = int(m[2])
                add(f"{prefix}_layers", int(m[3]))
            pending_swa = None
        elif m := _RE_COMPUTE.search(line):
            add("compute", _mib(m[2]))
        elif m := _RE_COMPUTE_4DP.search(line):
            add("compute_4dp", _mib(m[2]))
        elif m := _RE_CTX.search(line):
            out[m[1]] = int(m[2])
        elif m := _RE_FA.search(line):
            out["flash_attn"] = int(m[1] == "enabled")
        elif m := _RE_HP.search(line):
            out[f"hp_{m[1]}"] = int(m[2])
    return out


def _log_tail(log: str, n: int = 6) -> str:
    """The lines of a failed load that say why: llama.cpp's own complaint first, then Python's."""
    lines = log.splitlines()
    ours = [ln for ln in lines if re.match(r"^\w+: ", ln) and not ln.startswith("print_info") and re.search(
        r"\berror\b|failed|assert|requires|does not|not supported|invalid", ln, re.IGNORECASE)]
    theirs = [ln for ln in lines if re.match(r"^\w*(Error|Exception|Exit)\b", ln)]
    ours = [ln for ln in ours if ln not in theirs]
    return "\n".join(ours[-n:] + theirs[-1:]) or "\n".join(lines[-n:])


# --- the exact breakdown shim ------------------------------------------------------------------------------

_SHIM_SRC = r"""
#include <cstddef>
#include <cstring>
#include <map>
#include "ggml-backend.h"
#include "llama.h"
// Mirrors src/llama-ext.h (llama.cpp's C++ staging API), which the wheel does not ship.
struct llama_memory_breakdown_data { size_t model = 0; size_t context = 0; size_t compute = 0; };
LLAMA_API std::map<ggml_backend_buffer_type_t, llama_memory_breakdown_data>
llama_get_memory_breakdown(const struct llama_context * ctx);
extern "C" int mixrun_memory_breakdown(const llama_context * ctx, char (*names)[64], size_t * sizes, int cap) {
    int i = 0;
    for (const auto & [buft, mb] : llama_get_memory_breakdown(ctx)) {
        if (i == cap) break;
        std::strncpy(names[i], ggml_backend_buft_name(buft), 63);
        names[i][63] = 0;
        sizes[3 * i] = mb.model; sizes[3 * i + 1] = mb.context; sizes[3 * i + 2] = mb.compute;
        ++i;
    }
    return i;
}
"""


def build_breakdown_shim() -> str | None:
    """Compile (once, cached in the temp dir) the shim that exposes ``llama_get_memory_breakdown`` to ctypes.

    Returns the shared library's path, or None where there is no C++ compiler, no ``llama.h`` beside the wheel,
    or the build fails.
    """
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    include = Path(llama_cpp.__file__).parent.parent / "include"
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if not cxx or not (include / "llama.h").is_file() or not (lib / "libllama.so").exists():
        return None
    key = hashlib.sha256(_SHIM_SRC.encode() + str((lib / "libllama.so").resolve().stat().st_mtime).encode())
    so = Path(tempfile.gettempdir()) / f"mixrun-llama-breakdown-{key.hexdigest()[:12]}.so"
    if so.exists():
        return str(so)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "shim.cpp"
        src.write_text(_SHIM_SRC)
        cmd = [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", f"-I{include}", str(src), "-o", str(Path(d) / "s.so"),
               f"-L{lib}", "-lllama", "-lggml-base", f"-Wl,-rpath,{lib}"]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            return None
        shutil.move(str(Path(d) / "s.so"), so)
    return str(so)


# --- the child process ---------------------------------------------------------------------------------------


def _child(cfg_json: str) -> None:
    """Runs in the subprocess: load, report model size (and the exact breakdown) on stdout, free."""
    import ctypes

    import llama_cpp
    from llama_cpp import _logger

    _logger.set_verbose(True)
    cfg = json.loads(cfg_json)
    type_k, type_v = ggml_type(cfg["type_k"]), ggml_type(cfg["type_v"])
    fa = cfg["flash_attn"]
    fa_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if fa is None else
               llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if fa else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    llm = None
    extra = cfg.get("extra_buffers", True)
    if cfg["no_alloc"]:
        # Llama() has no no_alloc knob: build the model and context with the C API as `llama-server --fit` does.
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers, mp.no_alloc, mp.load_mode = 0, True, llama_cpp.LLAMA_LOAD_MODE_NONE
        mp.use_extra_bufts = extra
        model = llama_cpp.llama_model_load_from_file(cfg["model_path"].encode(), mp)
        if not model:
            sys.exit(2)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = cfg["n_ctx"], cfg["n_batch"], cfg["n_ubatch"]
        cp.type_k, cp.type_v, cp.flash_attn_type = type_k, type_v, fa_type
        if cfg["swa_full"] is not None:
            cp.swa_full = cfg["swa_full"]
        ctx = llama_cpp.llama_init_from_model(model, cp)
        if not ctx:
            sys.exit(3)
    else:
        if fa is None:  # Llama() only knows on/off
            raise SystemExit("flash_attn=None (auto) needs no_alloc=True")
        kw: dict[str, Any] = {} if cfg["swa_full"] is None else {"swa_full": cfg["swa_full"]}
        low = llama_cpp.llama_cpp
        defaults = low.llama_model_default_params

        def with_extra() -> Any:  # Llama() has no use_extra_bufts knob: it builds its params from these defaults
            mp = defaults()
            mp.use_extra_bufts = extra
            return mp

        low.llama_model_default_params = with_extra
        try:
            llm = llama_cpp.Llama(cfg["model_path"], n_ctx=cfg["n_ctx"], n_batch=cfg["n_batch"],
                                  n_ubatch=cfg["n_ubatch"], type_k=type_k, type_v=type_v, flash_attn=bool(fa),
                                  n_gpu_layers=0, verbose=True, **kw)
        finally:
            low.llama_model_default_params = defaults
        model, ctx = llm._model.model, llm._ctx.ctx
    res = {"model_size": int(llama_cpp.llama_model_size(model)), "n_params": int(llama_cpp.llama_model_n_params(model))}
    if cfg["shim"]:
        shim = ctypes.CDLL(cfg["shim"])
        shim.mixrun_memory_breakdown.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        names, sizes = (ctypes.c_char * 64 * 16)(), (ctypes.c_size_t * 48)()
        n = shim.mixrun_memory_breakdown(ctx, names, sizes, 16)
        for i in range(n):
            buft = names[i].value.decode()
            for j, part in enumerate(("model", "context", "compute")):
                res[f"exact_{part}"] = res.get(f"exact_{part}", 0) + sizes[3 * i + j]
                if sizes[3 * i + j]:
                    res[f"exact_{part}_{buft}"] = sizes[3 * i + j]
    sys.stderr.flush()
    print(_MARK + json.dumps(res), flush=True)
    if llm is not None:
        llm.close()  # the destructor logs the compute size with 4 decimals
    else:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


def llamacpp_buffers(model_path: str, n_ctx: int, n_batch: int = 512, n_ubatch: int = 512, type_k: str = "f16",
                     type_v: str = "f16", flash_attn: bool | None = False, *, swa_full: bool | None = None,
                     no_alloc: bool = False, exact: bool | str = False, extra_buffers: bool = True,
                     timeout: float = 600) -> dict[str, int]:
    """Load ``model_path`` on the CPU in a subprocess and return llama.cpp's own buffer sizes, in bytes.

    Keys as in :func:`parse_log`, plus ``model_size`` and ``n_params`` (exact, from ``llama_model_size`` /
    ``llama_model_n_params``) and, with ``exact``, ``exact_model`` / ``exact_context`` / ``exact_compute`` (and
    ``exact_<part>_<buffer type>``). ``exact`` may be a prebuilt shim path (see :func:`build_breakdown_shim`).
    A quantized V cache needs ``flash_attn=True``. ``swa_full=None`` keeps llama.cpp's default for the context
    (full-size SWA cache in llama_context_default_params; llama-server's default is the small one).
    ``extra_buffers=False`` turns llama.cpp's CPU extra buffer types (repacked weights) off.
    Raises :class:`LlamaCppLoadError` when llama.cpp refuses the model or the context.
    """
    shim = build_breakdown_shim() if exact is True else (exact or None)
    if exact and not shim:
        raise RuntimeError("exact=True needs a C++ compiler and llama.h beside the llama_cpp wheel")
    cfg = {"model_path": str(model_path), "n_ctx": n_ctx, "n_batch": n_batch, "n_ubatch": n_ubatch,
           "type_k": type_k, "type_v": type_v, "flash_attn": flash_attn, "swa_full": swa_full,
           "no_alloc": no_alloc, "shim": shim, "extra_buffers": extra_buffers}
    ggml_type(type_k), ggml_type(type_v)  # fail early on a bad name
    code = f"import sys; sys.path.insert(0, {str(_HERE)!r}); import llamacpp_memory as m; m._child(sys.argv[1])"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    log = proc.stderr + proc.stdout
    marks = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
    if proc.returncode != 0 or not marks:
        raise LlamaCppLoadError(f"llama.cpp failed to load {Path(model_path).name} (exit {proc.returncode})",
                                _log_tail(log))
    out = parse_log(log)
    out.update(json.loads(marks[-1][len(_MARK):]))
    return out


# --- the benchmark matrix --------------------------------------------------------------------------------------

# Real GGUFs written by tests/gguf_factory.py (F32 weights unless qtype says otherwise), loaded for real.
TINY_MODELS: dict[str, dict[str, Any]] = {
    "tiny-llama": {"arch": "llama", "n_layers": 2, "n_embd": 64},
    "tiny-qwen2": {"arch": "qwen2", "n_layers": 2, "n_embd": 64},
    "tiny-qwen3": {"arch": "qwen3", "n_layers": 2, "n_embd": 64, "head_dim": 32},
    "tiny-gemma2": {"arch": "gemma2", "n_layers": 4, "n_embd": 64, "sliding_window": 16},
    # wide enough that the logits, attention and FFN terms of the compute buffer can be told apart
    "small-llama": {"arch": "llama", "n_layers": 4, "n_embd": 256, "n_head": 8, "n_head_kv": 4, "n_ff": 768,
                    "n_vocab": 8000},
    # Q4_0 weights are repacked for the CPU (AVX2): a CPU_REPACK buffer beside the mapped file
    "small-llama-q4_0": {"arch": "llama", "n_layers": 4, "n_embd": 256, "n_head": 8, "n_head_kv": 4, "n_ff": 768,
                         "n_vocab": 8000, "qtype": "Q4_0"},
    # its own output.weight, last in the file: once repacked it is outside the mapped range (CPU_Mapped shrinks)
    "small-llama-q4_0-untied": {"arch": "llama", "n_layers": 4, "n_embd": 256, "n_head": 8, "n_head_kv": 4,
                                "n_ff": 768, "n_vocab": 8000, "qtype": "Q4_0", "tied": False},
    # Q4_K is repacked with AVX2, Q6_K (attn_v, ffn_down of some layers) is not on x86
    "small-llama-q4_k_m": {"arch": "llama", "n_layers": 4, "n_embd": 256, "n_head": 8, "n_head_kv": 4, "n_ff": 768,
                           "n_vocab": 8000, "qtype": "Q4_K_M"},
    # Q2_K is repacked with AVX-512 only; Q8_0 only on Arm (NEON) and by AMX
    "small-llama-q2_k": {"arch": "llama", "n_layers": 4, "n_embd": 256, "n_head": 8, "n_head_kv": 4, "n_ff": 768,
                         "n_vocab": 8000, "qtype": "Q2_K"},
    "small-llama-q8_0": {"arch": "llama", "n_layers": 4, "n_embd": 256, "n_head": 8, "n_head_kv": 4, "n_ff": 768,
                         "n_vocab": 8000, "qtype": "Q8_0"},
}

# Header-only (sparse) GGUFs shaped like real models: no tensor data, so they are only projected (no_alloc).
SHAPED_MODELS: dict[str, dict[str, Any]] = {
    "shape-llama2-7b": {"arch": "llama", "n_layers": 32, "n_embd": 4096, "n_head": 32, "n_head_kv": 32,
                        "n_ff": 11008, "n_vocab": 32000},
    "shape-llama3-8b": {"arch": "llama", "n_layers": 32, "n_embd": 4096, "n_head": 32, "n_head_kv": 8,
                        "n_ff": 14336, "n_vocab": 128256},
    "shape-llama3.2-1b": {"arch": "llama", "n_layers": 16, "n_embd": 2048, "n_head": 32, "n_head_kv": 8,
                          "n_ff": 8192, "n_vocab": 128256},
    "shape-qwen2.5-7b": {"arch": "qwen2", "n_layers": 28, "n_embd": 3584, "n_head": 28, "n_head_kv": 4,
                         "n_ff": 18944, "n_vocab": 152064},
    "shape-qwen3-4b": {"arch": "qwen3", "n_layers": 36, "n_embd": 2560, "n_head": 32, "n_head_kv": 8,
                       "head_dim": 128, "n_ff": 9728, "n_vocab": 151936},
    "shape-gemma2-9b": {"arch": "gemma2", "n_layers": 42, "n_embd": 3584, "n_head": 16, "n_head_kv": 8,
                        "head_dim": 256, "n_ff": 14336, "n_vocab": 256000, "sliding_window": 4096},
}


@contextlib.contextmanager
def _writer_with_merges() -> Iterator[None]:
    """gguf_factory writes a "gpt2" vocabulary without merges, which llama.cpp refuses; add a single merge."""
    import gguf

    import gguf_factory

    class _Writer(gguf.GGUFWriter):
        def add_tokenizer_model(self, model: str) -> None:
            super().add_tokenizer_model(model)
            self.add_token_merges(["t 0"])

    saved = gguf_factory.GGUFWriter
    gguf_factory.GGUFWriter = _Writer
    try:
        yield
    finally:
        gguf_factory.GGUFWriter = saved


def write_models(folder: Path, specs: dict[str, dict[str, Any]], *, sparse: bool = False) -> dict[str, Path]:
    """Write each spec with tests/gguf_factory.py's ``write_model``; returns name -> path."""
    sys.path.insert(0, str(_HERE.parent / "tests"))
    import gguf_factory

    out = {}
    with _writer_with_merges():
        for name, spec in specs.items():
            kw = dict(spec)
            if sparse:
                kw.update(sparse=True, qtype=kw.get("qtype", "F16"), n_ctx=131072)
            out[name] = gguf_factory.write_model(folder / f"{name}.gguf", kw.pop("arch"), **kw)
    return out


def kv_configs(has_swa: bool, full: bool = True) -> list[dict[str, Any]]:
    """type_k/type_v/flash_attn(/swa_full) cases; q8_0 without FA is kept to record llama.cpp's refusal."""
    cfgs = [{"type_k": "f16", "type_v": "f16", "flash_attn": False},
            {"type_k": "f16", "type_v": "f16", "flash_attn": True}]
    if full:
        cfgs += [{"type_k": "q8_0", "type_v": "q8_0", "flash_attn": True},
                 {"type_k": "q8_0", "type_v": "q8_0", "flash_attn": False}]
    if has_swa:
        cfgs.append({"type_k": "f16", "type_v": "f16", "flash_attn": False, "swa_full": False})
    return cfgs


def run_matrix(models: dict[str, Path], n_ctxs: list[int], n_ubatches: list[int], *, n_batch: int = 512,
               specs: dict[str, dict[str, Any]] | None = None, exact: bool = False, no_alloc: bool = False,
               check_no_alloc: bool = False, full_kv: bool = True, extra_buffers: tuple[bool, ...] = (True,),
               echo: Any = sys.stderr) -> list[dict[str, Any]]:
    """Run every model x n_ctx x n_ubatch x kv_configs() x ``extra_buffers`` case; prints one table row per case to
    ``echo``. Each row records ``extra_bufts`` (rows saved before it was recorded were loaded with them on).

    ``n_batch`` is raised to ``n_ubatch`` where smaller (llama.cpp would clamp the micro-batch to it).
    """
    shim = build_breakdown_shim() if exact else None
    if exact and not shim:
        print("note: no C++ compiler or llama.h; running without --exact", file=sys.stderr)
    rows = []
    for name, path in models.items():
        has_swa = bool((specs or {}).get(name, {}).get("sliding_window"))
        for n_ctx in n_ctxs:
            for ub in n_ubatches:
                for kv, extra in [(kv, e) for kv in kv_configs(has_swa, full_kv) for e in extra_buffers]:
                    row: dict[str, Any] = {"model": name, "n_ctx": n_ctx, "n_batch": max(n_batch, ub),
                                           "n_ubatch": ub, "swa_full": None, **kv, "no_alloc": no_alloc,
                                           "extra_bufts": extra}
                    args = {k: row[k] for k in ("n_ctx", "n_batch", "n_ubatch", "type_k", "type_v", "flash_attn",
                                                "swa_full")}
                    args["extra_buffers"] = extra
                    try:
                        row["result"] = llamacpp_buffers(str(path), **args, no_alloc=no_alloc, exact=shim or False)
                        if check_no_alloc and not no_alloc:
                            pr = llamacpp_buffers(str(path), **args, no_alloc=True, exact=shim or False)
                            row["projected"] = {k: pr.get(k) for k in _COMPARED if k in row["result"]}
                    except LlamaCppLoadError as e:
                        row["error"], row["error_log"] = str(e), e.log_tail.splitlines()
                    rows.append(row)
                    print(_row_text(row), file=echo, flush=True)
    return rows


# what a no_alloc projection is compared on (the weights differ by design: it loads without mmap)
_COMPARED = ("kv", "kv_swa", "compute", "output", "exact_context", "exact_compute")


def _fmt(v: int | None) -> str:
    return "-" if v is None else f"{v / MiB:.2f}"


def _row_text(row: dict[str, Any]) -> str:
    kv = f"{row['type_k']}/{row['type_v']}"
    head = (f"{row['model']:17} {row['n_ctx']:>5} {row['n_ubatch']:>4} {kv:9} {'fa' if row['flash_attn'] else '  '}"
            f" {'swa' if row.get('swa_full') is False else '   '} {'on ' if row.get('extra_bufts', True) else 'off'}")
    if "error" in row:
        return f"{head}  ERROR {(row['error_log'] or [row['error']])[0][:100]}"
    r = row["result"]
    weights = r.get("weights") or r.get("model_size")
    cells = f"{r.get('kv_cells', 0)}" + (f"+{r['kv_swa_cells']}" if "kv_swa_cells" in r else "")
    text = (f"{head} {_fmt(weights):>8} {_fmt(r.get('kv')):>8} {cells:>10} {_fmt(r.get('compute')):>8}"
            f" {_fmt(r.get('output')):>6}")
    extra = [f"{k.removeprefix('weights_')} {_fmt(v)}" for k, v in r.items()
             if k.startswith("weights_") and k != "weights_CPU_Mapped"]
    if extra:
        text += f" (+ {', '.join(extra)})"
    if "exact_compute" in r:
        text += f" {r['exact_model']:>10} {r['exact_context']:>10} {r['exact_compute']:>10}"
    if row.get("no_alloc"):
        text += "  (projected)"
    if "projected" in row:
        diff = [f"{k}={v}" for k, v in row["projected"].items() if v != r[k]]
        text += "  no_alloc: " + ("same" if not diff else "DIFFERS " + ", ".join(diff))
    return text


def _header(exact: bool) -> str:
    h = (f"{'model':17} {'n_ctx':>5} {'ub':>4} {'K/V':9} fa swa xb  {'weights':>8} {'kv':>8} {'kv cells':>10}"
         f" {'compute':>8} {'output':>6}")
    if exact:
        h += f" {'ex.model':>10} {'ex.ctx':>10} {'ex.comp':>10}"
    return h + ("\n(MiB as logged, 2 decimals; xb: CPU extra buffer types on/off; ex.* exact bytes from "
                "llama_get_memory_breakdown)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the results as JSON (the table goes to stderr)")
    ap.add_argument("--out", type=Path, help="also write the JSON to this file")
    ap.add_argument("--exact", action="store_true", help="add llama.cpp's exact byte counts (needs g++)")
    ap.add_argument("--no-alloc", action="store_true", help="project with no_alloc instead of allocating")
    ap.add_argument("--check-no-alloc", action="store_true", help="also project each case with no_alloc, compare")
    ap.add_argument("--extra-bufts", choices=("on", "off", "both"), default="on",
                    help="load with llama.cpp's CPU extra buffer types (repacked weights) on (its default), off "
                         "(--no-repack), or both")
    ap.add_argument("--shapes", action="store_true",
                    help="also project header-only GGUFs shaped like real 1B-9B models (no_alloc)")
    ap.add_argument("--n-ctx", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--n-ubatch", type=int, nargs="+", default=[512, 128])
    ap.add_argument("--shape-n-ctx", type=int, nargs="+", default=[512, 4096, 16384, 32768])
    ap.add_argument("--shape-n-ubatch", type=int, nargs="+", default=[512, 128, 2048])
    ap.add_argument("--models", nargs="+", metavar="NAME",
                    help="subset of: smollm2 " + " ".join([*TINY_MODELS, *SHAPED_MODELS]))
    ap.add_argument("--quick", action="store_true", help="first context and micro-batch size only")
    args = ap.parse_args()
    if args.quick:
        args.n_ctx, args.n_ubatch = args.n_ctx[:1], args.n_ubatch[:1]
        args.shape_n_ctx, args.shape_n_ubatch = args.shape_n_ctx[:1], args.shape_n_ubatch[:1]

    import llama_cpp

    from mixrun.bundled import default_model

    def wanted(specs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in specs.items() if not args.models or k in args.models}

    echo = sys.stderr if args.json else sys.stdout
    print(_header(args.exact and build_breakdown_shim() is not None), file=echo)
    with tempfile.TemporaryDirectory(prefix="llamacpp-memory-") as tmp:
        models: dict[str, Path] = {}
        if not args.models or "smollm2" in args.models:
            models["smollm2"] = Path(default_model())
        models.update(write_models(Path(tmp), wanted(TINY_MODELS)))
        extra = {"on": (True,), "off": (False,), "both": (True, False)}[args.extra_bufts]
        rows = run_matrix(models, args.n_ctx, args.n_ubatch, specs=TINY_MODELS, exact=args.exact,
                          no_alloc=args.no_alloc, check_no_alloc=args.check_no_alloc, extra_buffers=extra, echo=echo)
        shaped = wanted(SHAPED_MODELS) if args.shapes else {}
        if shaped:
            rows += run_matrix(write_models(Path(tmp), shaped, sparse=True), args.shape_n_ctx, args.shape_n_ubatch,
                               specs=SHAPED_MODELS, exact=args.exact, no_alloc=True, full_kv=False,
                               extra_buffers=extra, echo=echo)
    hparams: dict[str, dict[str, int]] = {}
    for row in rows:  # the shapes llama.cpp read, once per model rather than in every row
        for k in [k for k in row.get("result", {}) if k.startswith("hp_")]:
            hparams.setdefault(row["model"], {})[k[3:]] = row["result"].pop(k)
    specs = {**({"smollm2": {"path": str(models["smollm2"])}} if "smollm2" in models else {}),
             **{k: v for k, v in TINY_MODELS.items() if k in models},
             **{k: {**v, "sparse": True} for k, v in shaped.items()}}
    doc = {
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "units": "bytes; keys without exact_ are parsed from log lines printed in MiB with 2 decimals",
        "log_precision_bytes": LOG_PRECISION_BYTES,
        "log_precision_bytes_compute_4dp": LOG_PRECISION_BYTES_4DP,
        "models": {k: {**v, "llama_cpp_hparams": hparams.get(k, {})} for k, v in specs.items()},
        "rows": rows,
    }
    # one line per row keeps the file diffable without making it long
    body = ",\n".join("  " + json.dumps(row) for row in rows)
    text = json.dumps({**doc, "rows": []}, indent=1)[:-len(' "rows": []\n}')] + f' "rows": [\n{body}\n ]\n}}'
    json.loads(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        print(text)


if __name__ == "__main__":
    main()
