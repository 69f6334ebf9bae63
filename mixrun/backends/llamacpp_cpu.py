"""Is this llama.cpp build safe on this CPU? Found out once per machine, in a child process, and cached.

Two ways a llama.cpp build kills the process that loads it, and what mixrun does about each:

- **Extra buffer types that crash.** On x86, llama.cpp repacks quantized weights into CPU-specific layouts, its
  "extra" buffer types (``AMX`` on Intel Xeons with AMX tiles, ``CPU_REPACK`` for AVX2/AVX-512/NEON). On some hosts
  the AMX path dies with SIGSEGV (a general protection fault at ``ldtilecfg``) on the first batch of 2+ tokens: a VM
  that does not grant the tile state, a compiler that drops the tile configuration, AMX permission asked for on the
  main thread only (llama.cpp #20824, PR #26954; ollama #17205, #17249). A probe loads a quantized model in a child
  process and decodes a batch; if that dies or hangs, mixrun loads with ``use_extra_bufts = False`` (llama.cpp's
  ``--no-repack``; ``llama_model_params`` in llama.h) and says so in one note. Where the probe survives the extra
  buffers stay on: they speed up CPU prefill.
- **A build for another CPU.** ``llama_print_system_info()`` lists the instruction sets the build was compiled for
  (``ggml_cpu_has_avx2()`` and friends in ggml-cpu.c are ``#if defined(__AVX2__)`` tests, collected by
  ``ggml_backend_cpu_get_features`` in ggml-cpu.cpp). One this CPU lacks means SIGILL somewhere later (llama.cpp
  #28756), so mixrun refuses before loading, naming them.

``MIXRUN_LLAMA_REPACK=on|off`` forces the choice. Findings are cached per CPU model and flags,
kernel, and llama.cpp build (the binding's version and its shared libraries' sizes and times), so the probe runs
once per machine, not once per chat.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixrun.errors import MixrunError
from mixrun.rig.discover import cpu_info

ENV = "MIXRUN_LLAMA_REPACK"
CACHE_FILE = "llamacpp-cpu.json"
PROBE_TIMEOUT_S = 90.0
PROBE_VERSION = 2  # part of the cache key: a finding made by an older probe is made again
MAX_PROBE_OUTPUT = 1 << 20
# llama.cpp's feature names -> the CPU flags Linux reports for them (x86 "flags", Arm "Features" in /proc/cpuinfo).
# Features not named here (LLAMAFILE, OPENMP, REPACK, SVE_CNT, ...) are build options, not instructions.
FEATURE_FLAGS = {
    "SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX_VNNI": "avx_vnni", "AVX2": "avx2", "F16C": "f16c",
    "FMA": "fma", "BMI2": "bmi2", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8",
    "NEON": "asimd", "FP16_VA": "asimdhp", "MATMUL_INT8": "i8mm", "SVE": "sve", "DOTPROD": "asimddp", "SME": "sme",
}
_BUFFER_LINE = re.compile(r"\b([A-Za-z0-9_]+) model buffer size\s*=")
# Buffer types llama.cpp's report names that are not extra (repacked) types.
_PLAIN_BUFFERS = frozenset({"CPU", "CPU_Mapped", "CUDA_Host", "CPU_Host"})


class LlamaCppCpuError(MixrunError):
    """This llama.cpp build cannot run on this CPU at all."""


@dataclass(frozen=True)
class CpuFinding:
    """What the probe found. ``extra_buffers`` is what loads use; ``buffer_types`` the extra types then in force."""

    extra_buffers: bool
    buffer_types: tuple[str, ...] = ()
    outcome: str = "ok"  # ok | crashed | hung | failed | forced
    note: str | None = None  # one line for the user when the choice differs from llama.cpp's default
    missing: tuple[str, ...] = ()  # instruction sets the build uses that this CPU lacks
    unusable: str | None = None  # why llama.cpp dies here even without extra buffers

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> CpuFinding | None:
        """A cached finding, or None when the entry is not one (the cache is not trusted)."""
        if not isinstance(data, dict):
            return None
        try:
            f = cls(extra_buffers=bool(data["extra_buffers"]),
                    buffer_types=tuple(str(b)[:32] for b in data.get("buffer_types", ())[:16]),
                    outcome=str(data.get("outcome", "ok"))[:16],
                    note=None if data.get("note") is None else str(data["note"])[:400],
                    missing=tuple(str(m)[:32] for m in data.get("missing", ())[:64]),
                    unusable=None if data.get("unusable") is None else str(data["unusable"])[:400])
        except (KeyError, TypeError):
            return None
        return f

    def problem(self) -> str | None:
        """Why llama.cpp cannot run here at all, in one line, or None."""
        if self.missing:
            return (f"llama.cpp: this build uses {', '.join(self.missing)}, which this CPU lacks; it would die with an "
                    "illegal instruction. Rebuild it here: pip install --force-reinstall --no-cache-dir "
                    "llama-cpp-python")
        return f"llama.cpp: {self.unusable}" if self.unusable else None

    def require_usable(self) -> None:
        """Refuse, in one line, a build that cannot run here."""
        if (problem := self.problem()) is not None:
            raise LlamaCppCpuError(problem)

    def notes(self) -> list[str]:
        """What a profile or a chat should tell the user about llama.cpp on this CPU."""
        return [n for n in (self.note, self.problem()) if n]


# ---- what identifies a machine and a build -----------------------------------------------------------------------


def build_files() -> list[tuple[str, int, int]]:
    """(name, size, mtime) of the llama.cpp shared libraries llama-cpp-python loads, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    out: list[tuple[str, int, int]] = []
    for folder in (spec.submodule_search_locations or []) if spec else []:
        lib = Path(folder) / "lib"
        for p in sorted(lib.glob("*")) if lib.is_dir() else []:
            if p.suffix in (".so", ".dylib", ".dll") or ".so." in p.name:
                st = p.stat()
                out.append((p.name, st.st_size, st.st_mtime_ns))
    return out


def cache_key(cpu: tuple[str, frozenset[str]] | None = None, build: list[Any] | None = None) -> str:
    from importlib import metadata

    name, flags = cpu or cpu_info()
    try:
        version = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        version = "?"
    ident = {"probe": PROBE_VERSION, "cpu": name, "flags": sorted(flags), "kernel": platform.release(), "machine": platform.machine(),
             "llama_cpp_python": version, "libs": build if build is not None else build_files()}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def missing_features(system_info: str, flags: frozenset[str]) -> tuple[str, ...]:
    """Instruction sets the build was compiled for (``NAME = 1`` in llama.cpp's system info) that ``flags`` lack.
    Nothing is missing when the CPU's flags are unknown."""
    if not flags:
        return ()
    built = re.findall(r"\b([A-Z0-9_]+) = 1\b", system_info)
    return tuple(dict.fromkeys(f for f in built if f in FEATURE_FLAGS and FEATURE_FLAGS[f] not in flags))


# ---- the probe ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeRun:
    """How one probe child ended: its exit status (negative: killed by that signal), output, and whether it hung."""

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False


ProbeRunner = Callable[[bool], ProbeRun]


def probe_command(model: str, extra_buffers: bool) -> list[str]:
    cmd = [sys.executable, "-m", "mixrun.backends.llamacpp_probe", model]
    return cmd if extra_buffers else [*cmd, "--no-extra-bufts"]


def run_child(cmd: Sequence[str], timeout_s: float = PROBE_TIMEOUT_S) -> ProbeRun:
    """Run a probe child with a deadline; a hung child is killed with everything it started."""
    env = {**os.environ, "PYTHONFAULTHANDLER": "", "PYTHONUNBUFFERED": "1"}
    env.pop(ENV, None)
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    return ProbeRun(proc.returncode, out[-MAX_PROBE_OUTPUT:].decode(errors="replace"),
                    err[-MAX_PROBE_OUTPUT:].decode(errors="replace"), timed_out)


def default_runner(model: str | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> ProbeRunner:
    """Probe with the bundled model (quantized Q4_1, which the extra buffer types take)."""
    def run(extra_buffers: bool) -> ProbeRun:
        from mixrun.bundled import default_model

        return run_child(probe_command(model or default_model(), extra_buffers), timeout_s)

    return run


def _printed(stdout: str, key: str) -> Any:
    """A value the probe printed as a one-key JSON line, or None."""
    for line in stdout.splitlines()[:16]:
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if isinstance(data, dict) and key in data:
                return data[key]
    return None


def _how(run: ProbeRun) -> str:
    if run.timed_out:
        return "hung"
    if run.returncode < 0:
        try:
            return f"died with {signal.Signals(-run.returncode).name}"
        except ValueError:
            return f"died with signal {-run.returncode}"
    last = [ln for ln in run.stderr.strip().splitlines() if ln.strip()]
    return f"failed (exit {run.returncode}: {last[-1][:160] if last else 'no message'})"


def probe(runner: ProbeRunner, flags: frozenset[str]) -> CpuFinding:
    """Run the probe with extra buffers on; if it dies or hangs, once more with them off. Pure given ``runner``."""
    first = runner(True)
    missing = missing_features(str(_printed(first.stdout, "system_info") or ""), flags)
    if first.returncode == -signal.SIGILL and not missing:
        missing = ("instructions this CPU lacks (the build's list was not printed)",)
    if missing:
        return CpuFinding(extra_buffers=False, outcome="crashed" if first.returncode else "ok", missing=missing)
    if first.returncode == 0 and not first.timed_out:
        listed = _printed(first.stdout, "extra_buffer_types")
        if not isinstance(listed, list):  # a build without the registry: the types that took the probe's weights
            listed = [b for b in _BUFFER_LINE.findall(first.stderr) if b not in _PLAIN_BUFFERS]
        types = tuple(dict.fromkeys(str(b)[:32] for b in listed[:16]))
        return CpuFinding(extra_buffers=True, buffer_types=types)
    if first.returncode > 0 and not first.timed_out:
        # the probe itself could not run (no bundled model, a broken install): no evidence either way
        return CpuFinding(extra_buffers=True, outcome="failed", note=f"llama.cpp CPU probe {_how(first)}")
    how = _how(first)
    second = runner(False)
    if second.returncode != 0 or second.timed_out:
        return CpuFinding(extra_buffers=False, outcome="crashed" if not first.timed_out else "hung",
                          unusable=f"a batched decode {how} with its extra buffer types and {_how(second)} "
                                   "without them on this CPU; rebuild llama-cpp-python here or use --backend torch")
    return CpuFinding(extra_buffers=False, outcome="hung" if first.timed_out else "crashed",
                      note=f"llama.cpp's repacked CPU weights (extra buffer types) {how} on this CPU in a test "
                           f"decode: loading without them (slower CPU prefill; {ENV}=on forces them)")


def apply_env(f: CpuFinding, env: Mapping[str, str]) -> CpuFinding:
    """The finding with the user's ``MIXRUN_LLAMA_REPACK`` choice applied (the feature check still stands)."""
    value = env.get(ENV, "").strip().lower()
    if value in ("1", "on", "true", "yes"):
        return dataclasses.replace(f, extra_buffers=True, outcome="forced", note=None)
    if value in ("0", "off", "false", "no"):
        return dataclasses.replace(f, extra_buffers=False, buffer_types=(), outcome="forced",
                                   note=f"llama.cpp's repacked CPU weights are off ({ENV}={env[ENV]})")
    return f


def finding(runner: ProbeRunner | None = None, *, env: Mapping[str, str] | None = None,
            refresh: bool = False) -> CpuFinding:
    """This machine's finding: cached, or probed now (then cached), with the environment's choice applied."""
    from mixrun.fsutil import read_cache, write_cache

    env = os.environ if env is None else env
    cpu = cpu_info()
    key = cache_key(cpu)
    f = None if refresh else CpuFinding.from_json(read_cache(CACHE_FILE).get(key))
    if f is None:
        f = probe(runner or default_runner(), cpu[1])
        if f.outcome != "failed":
            write_cache(CACHE_FILE, key, f.to_json())
    return apply_env(f, env)
