"""The llama.cpp CPU guard: a probe that crashes, hangs or passes decides the extra buffer types; a build for another
CPU is refused; findings are cached per machine; the engine loads with the finding's choice.

The fallback's tests inject probes (fake results, and real child processes that die or hang), so they hold on any
host: nothing here depends on this CPU having AMX.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import gguf_factory
from mixrun.backends import llamacpp_cpu as guard
from mixrun.backends.llamacpp_cpu import CpuFinding, LlamaCppCpuError, ProbeRun, probe, run_child
from mixrun.rig.discover import cpu_info

X86 = frozenset({"pni", "ssse3", "avx", "avx2", "f16c", "fma", "bmi2", "avx512f", "avx512_vnni"})
INFO = json.dumps({"system_info": "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | FMA = 1 | LLAMAFILE = 1 | REPACK = 1 | "})
LOADED = "load_tensors:   CPU_Mapped model buffer size =    92.10 MiB\nload_tensors:   AMX model buffer size = 95.34 MiB\n"
OK = ProbeRun(0, INFO + "\nok\n", LOADED)
SEGV = ProbeRun(-signal.SIGSEGV, INFO + "\n", LOADED)
HUNG = ProbeRun(-signal.SIGKILL, INFO + "\n", LOADED, timed_out=True)


def runner(with_extra: ProbeRun, without: ProbeRun = OK) -> tuple[guard.ProbeRunner, list[bool]]:
    calls: list[bool] = []

    def run(extra: bool) -> ProbeRun:
        calls.append(extra)
        return with_extra if extra else without

    return run, calls


def test_a_passing_probe_keeps_the_extra_buffers_and_names_them() -> None:
    run, calls = runner(OK)
    f = probe(run, X86)
    assert f == CpuFinding(extra_buffers=True, buffer_types=("AMX",))
    assert calls == [True] and f.note is None
    f.require_usable()


def test_a_crashing_probe_turns_them_off_with_one_note() -> None:
    run, calls = runner(SEGV)
    f = probe(run, X86)
    assert calls == [True, False]
    assert not f.extra_buffers and f.outcome == "crashed" and f.buffer_types == ()
    assert "SIGSEGV" in f.note and "\n" not in f.note and guard.ENV in f.note
    f.require_usable()


def test_a_hanging_probe_counts_as_a_crash() -> None:
    f = probe(runner(HUNG)[0], X86)
    assert not f.extra_buffers and f.outcome == "hung" and "hung" in f.note


def test_a_probe_that_dies_either_way_refuses_llama_cpp() -> None:
    f = probe(runner(SEGV, SEGV)[0], X86)
    with pytest.raises(LlamaCppCpuError, match="SIGSEGV.*without them"):
        f.require_usable()


def test_a_probe_that_cannot_run_is_no_evidence() -> None:
    broken = ProbeRun(1, "", "Traceback ...\nModuleNotFoundError: No module named 'llama_cpp'\n")
    run, calls = runner(broken)
    f = probe(run, X86)
    assert f.extra_buffers and f.outcome == "failed" and calls == [True]
    assert "ModuleNotFoundError" in f.note


def test_a_build_for_another_cpu_is_refused_before_loading() -> None:
    info = json.dumps({"system_info": "CPU : AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | OPENMP = 1 | "})
    f = probe(runner(ProbeRun(0, info + "\nok\n", ""))[0], frozenset({"avx2", "avx512f"}))
    assert f.missing == ("AMX_INT8",)
    with pytest.raises(LlamaCppCpuError, match="uses AMX_INT8, which this CPU lacks"):
        f.require_usable()
    # SIGILL with no feature list printed (the import itself died) is refused too
    f = probe(runner(ProbeRun(-signal.SIGILL, "", ""))[0], X86)
    with pytest.raises(LlamaCppCpuError, match="illegal instruction"):
        f.require_usable()


def test_build_features_against_cpu_flags() -> None:
    info = "CPU : SSE3 = 1 | AVX512 = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | REPACK = 1 | NEON = 0 | "
    assert guard.missing_features(info, frozenset({"pni", "avx512f"})) == ("AVX512_BF16",)
    assert guard.missing_features(info, frozenset()) == ()  # flags unknown: nothing to say
    name, flags = cpu_info("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 amx_int8\n\n"
                                 "processor\t: 1\nmodel name\t: Other\n")
    assert name == "Test CPU" and {"avx2", "amx_int8"} <= flags


CRASH = "import os, signal, sys; print('{}'); sys.stdout.flush(); os.kill(os.getpid(), signal.SIGSEGV)"
HANG = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
       "time.sleep(60)"


def test_real_children_that_crash_or_hang() -> None:
    crashed = run_child([sys.executable, "-c", CRASH])
    assert crashed.returncode == -signal.SIGSEGV and not crashed.timed_out
    hung = run_child([sys.executable, "-c", HANG], timeout_s=1.0)
    assert hung.timed_out
    # the child's own child went with it (killed as a process group)
    left = subprocess.run(["pgrep", "-f", "import time; time.sleep(60)"], capture_output=True, text=True)
    assert left.stdout.strip() == ""
    ok = [sys.executable, "-c", f"print({INFO!r})"]

    def run(extra: bool) -> ProbeRun:
        return run_child([sys.executable, "-c", HANG] if extra else ok, timeout_s=1.0)

    f = probe(run, X86)
    assert not f.extra_buffers and f.outcome == "hung"


def test_findings_are_cached_per_machine_and_the_environment_forces_either_way(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIXRUN_CACHE_DIR", str(tmp_path))
    run, calls = runner(SEGV)
    f = guard.finding(run, env={})
    assert not f.extra_buffers and calls == [True, False]
    assert guard.finding(run, env={}) == f and calls == [True, False]  # cached: no second probe
    on = guard.finding(run, env={guard.ENV: "on"})
    assert on.extra_buffers and on.note is None and on.outcome == "forced"
    off = guard.finding(runner(OK)[0], env={guard.ENV: "0"}, refresh=True)
    assert not off.extra_buffers and guard.ENV in off.note
    # a corrupt cache is measured again, not trusted
    (tmp_path / guard.CACHE_FILE).write_text(json.dumps({guard.cache_key(): {"extra_buffers": "x", "missing": 5}}))
    run, calls = runner(OK)
    assert guard.finding(run, env={}).extra_buffers and calls == [True]
    (tmp_path / guard.CACHE_FILE).write_text("not json")
    run, calls = runner(OK)
    assert guard.finding(run, env={}).extra_buffers and calls == [True]


def test_the_engine_loads_without_extra_buffers_when_they_crash(smollm2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import llama_cpp

    from mixrun.backends import llamacpp
    from mixrun.backends.base import Sampling, Stats

    seen: list[bool] = []
    load = llama_cpp.llama_cpp.llama_model_load_from_file

    def recording_load(path: bytes, params: object) -> object:
        seen.append(params.use_extra_bufts)
        return load(path, params)

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_load_from_file", recording_load)
    crashed = probe(runner(SEGV)[0], X86)
    monkeypatch.setattr(llamacpp, "finding", lambda: crashed)
    engine = llamacpp.LlamaCppEngine(smollm2, n_ctx=256, n_threads=2)
    try:
        assert seen == [False]
        assert any("SIGSEGV" in n for n in engine.info.notes)
        text = "".join(engine.generate(engine.template.render([{"role": "user", "content": "Say hi"}]),
                                       Sampling(temperature=0, max_tokens=8), Stats()))
        assert text.strip()
    finally:
        engine.close()
    monkeypatch.setattr(llamacpp, "finding", lambda: probe(runner(OK)[0], X86))
    engine = llamacpp.LlamaCppEngine(smollm2, n_ctx=256, n_threads=2)
    engine.close()
    assert seen == [False, True]


PLUMBING = textwrap.dedent("""
    import sys, llama_cpp
    from mixrun.backends.llamacpp_load import llama_params
    with llama_params(llama_cpp, extra_buffers=sys.argv[2] == "on"):
        llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, verbose=True)
""")


def test_llama_cpp_itself_drops_the_repacked_copy(tmp_path: Path) -> None:
    """On the real build: a Q4_0 model gets an extra buffer type (CPU_REPACK on AVX2 hosts, AMX on AMX hosts) with
    them on, and none with them off. Loading alone never reaches the crashing batched path."""
    model = gguf_factory.write_model(tmp_path / "q4_0.gguf", n_embd=256, n_ff=512, n_head=4, n_head_kv=4,
                                     qtype="Q4_0", merges=True)
    reports = {}
    for mode in ("on", "off"):
        out = subprocess.run([sys.executable, "-c", PLUMBING, str(model), mode], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        reports[mode] = {b for b in guard._BUFFER_LINE.findall(out.stderr) if b not in guard._PLAIN_BUFFERS}
    assert reports["on"] and reports["off"] == set()


def test_the_probe_names_the_buffer_types_ggml_lists() -> None:
    listed = ProbeRun(0, INFO + "\n" + json.dumps({"extra_buffer_types": ["AMX", "CPU_REPACK"]}) + "\nok\n", "")
    assert probe(runner(listed)[0], X86).buffer_types == ("AMX", "CPU_REPACK")


def test_ggml_lists_this_builds_cpu_extra_buffer_types() -> None:
    import llama_cpp

    from mixrun.backends.ggml import cpu_extra_buffer_types

    names = cpu_extra_buffer_types(llama_cpp)
    # x86 builds with REPACK (every CPU dev and CI hosts have) list CPU_REPACK; AMX hosts list AMX too
    assert names is not None and all(n.isidentifier() for n in names)
    if "REPACK = 1" in llama_cpp.llama_print_system_info().decode():
        assert "CPU_REPACK" in names
