"""``mixrun bench``: real runs of both backends on cpu-only recorded into a user copy of the profile and ranked by
the planner; fake engines for Ctrl-C, prefix reuse, --simulate and identical layouts; one-line errors."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mixrun.backends.base import Sampling, Stats
from mixrun.bench import command, measure, results
from mixrun.bench import record as bench_record
from mixrun.cli import main
from mixrun.errors import ProfileError
from mixrun.model.gguf import read_spec
from mixrun.model.spec import ModelSpec
from mixrun.planner import plan
from mixrun.rig.profile import load_profile, load_profile_file, save_profile


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixrun.cli", *args], capture_output=True, text=True, timeout=300)


# ---- real engines -----------------------------------------------------------------------------------------------


def test_bench_cpu_only_records_and_plan_ranks_by_it(smollm2: str, _isolated_config: Path) -> None:
    r = run_cli("bench", "--profile", "cpu-only", "--record", "--tokens", "8", "--prompt-tokens", "32",
                "--repeats", "1", "--ctx", "512", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {c["backend"] for c in out["candidates"]} == {"llama.cpp", "torch"}
    for c in out["candidates"]:
        assert c["status"] == "done", c
        (run,) = c["runs"]
        # exactly the asked prompt length, all of it prefilled (no KV prefix reuse from the warm-up)
        assert run["prompt_tokens"] == 32 and run["prefilled"] == 32, run
        assert run["completion_tokens"] == 8 and run["stop_reason"] == "length", run
        assert c["decode_tok_s"]["median"] > 0 and c["prefill_tok_s"]["median"] > 0
    # written into the isolated user dir under the bundled profile's name; the bundled one is untouched
    path = _isolated_config / "profiles" / "cpu-only.toml"
    assert out["recorded"] == str(path)
    prof = load_profile_file(path)
    assert prof.name == "cpu-only" and len(prof.results) == 2
    assert run_cli("profile", "validate", str(path)).returncode == 0
    size = Path(smollm2).stat().st_size
    for res in prof.results:
        assert res.model == Path(smollm2).name and res.model_bytes == size and res.source == "measured"
        assert res.ctx == 512 and res.mixrun_version and res.date and res.prompt_tokens == 32
        assert res.decode_tok_s_min <= res.decode_tok_s <= res.decode_tok_s_max
    # the following plan uses the recorded figures (user profile shadows the bundled one) and ranks by them
    rep = plan(load_profile("cpu-only"), read_spec(smollm2))
    recorded = {res.label: res.decode_tok_s for res in prof.results}
    for c in rep.candidates:
        assert c.measured and c.decode_tok_s == recorded[c.label]
    assert rep.best is not None and rep.best.decode_tok_s == max(recorded.values())
    shown = run_cli("plan", "--profile", "cpu-only")
    assert shown.returncode == 0 and shown.stdout.count("measured") >= 2


# ---- recording and the planner, without engines -----------------------------------------------------------------


def fake_report(model: str, spec: ModelSpec, profile: str, speeds: dict[str, float], **sel: Any) -> results.BenchReport:
    """A report as if each selected candidate (by label) ran once at the given decode speed."""
    rep = plan(load_profile(profile), spec)
    chosen, notes = command.select(rep, None, "auto", False, **sel)
    for m in chosen:
        m.runs.append(results.Run(64, 64, 9, 0.5, 8 / speeds[m.candidate.label], "length"))
        m.status = "done"
    return results.BenchReport(model=model, model_bytes=spec.file_bytes, profile=profile,
                             config=results.BenchConfig(), results=chosen, notes=notes)


def test_recorded_results_reverse_the_predicted_order(smollm2: str) -> None:
    spec = read_spec(smollm2)
    before = plan(load_profile("cpu-only"), spec)
    assert before.best.backend.value == "llama.cpp"  # predicted faster
    rep = fake_report(smollm2, spec, "cpu-only", {"llama.cpp, CPU only": 10.0, "torch, one device": 20.0})
    path = bench_record.record("cpu-only", bench_record.results_of(rep, date="2026-01-01"))
    after = plan(load_profile("cpu-only"), spec)
    assert after.best.backend.value == "torch" and after.best.measured and after.best.decode_tok_s == 20.0
    assert "measured 20 tok/s on 2026-01-01" in after.best.why
    # recording again replaces the same entries rather than piling them up; hand-written results stay
    prof = load_profile_file(path)
    hand = prof.results[0].model_copy(update={"label": None, "model": "other.gguf", "source": "user"})
    save_profile(prof.model_copy(update={"results": (hand, *prof.results)}), path)
    bench_record.record("cpu-only", bench_record.results_of(rep))
    assert len(load_profile_file(path).results) == 3
    # a result for another file of the same name (a different size) does not apply
    other = dataclasses.replace(spec, file_bytes=spec.file_bytes + 1)
    assert not any(c.measured for c in plan(load_profile("cpu-only"), other).candidates)


def test_identical_layouts_measured_once_recorded_for_both(smollm2: str) -> None:
    spec = read_spec(smollm2)
    rig = "dual-3090-nvlink-plus-3060"
    labels = {c.label for c in plan(load_profile(rig), spec).candidates}
    one, opt = "llama.cpp, one GPU (gpu0)", "llama.cpp layer, optimized -ts"
    assert {one, opt} <= labels
    speeds = dict.fromkeys(labels, 50.0) | {one: 300.0}
    rep = fake_report(smollm2, spec, rig, speeds)
    by_label = {m.candidate.label: m for m in rep.results}
    assert opt not in by_label and [t.label for t in by_label[one].twins] == [opt]
    assert any("same layout" in n for n in rep.notes)
    bench_record.record(rig, bench_record.results_of(rep))
    after = {c.label: c for c in plan(load_profile(rig), spec).candidates}
    assert after[one].measured and after[opt].measured and after[opt].decode_tok_s == 300.0
    # the label keeps the default-split layer candidate apart from the optimized one (same split and backend)
    assert after["llama.cpp layer, default split (by free memory)"].decode_tok_s == 50.0


# ---- fake engines -----------------------------------------------------------------------------------------------


class FakeEngine:
    """Word-level tokenizer, a KV cache that reuses the common prefix like the real engines, fixed speeds."""

    vocab: dict[str, int] = {}

    def __init__(self, backend: str, log: list[dict[str, Any]], interrupt_after: int | None) -> None:
        self.backend, self.log, self.interrupt_after = backend, log, interrupt_after
        self.fed: list[int] = []

    def tokenize(self, text: str) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab)) for w in re.findall(r"\w+|[^\w\s]", text)]

    def generate(self, prompt: str, sampling: Sampling, stats: Stats):
        ids = self.tokenize(prompt)
        shared = measure.common_prefix(self.fed, ids)
        self.log.append({"backend": self.backend, "prompt": len(ids), "shared": shared})
        if self.interrupt_after is not None and len(self.log) > self.interrupt_after:
            raise KeyboardInterrupt
        speed = 100.0 if self.backend == "llama.cpp" else 50.0
        stats.prompt_tokens, stats.completion_tokens = len(ids), sampling.max_tokens
        stats.prefill_s, stats.decode_s = (len(ids) - shared) / 1000, (sampling.max_tokens - 1) / speed
        self.fed = ids + [-1] * sampling.max_tokens
        yield "x"

    def close(self) -> None:
        self.log.append({"closed": self.backend})


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    state: dict[str, Any] = {"log": [], "interrupt_after": None, "starts": []}

    def start(model: str, candidate: Any, profile: Any, options: Any) -> FakeEngine:
        backend = candidate.backend.value
        state["starts"].append({"backend": backend, "model": model, "plan": candidate, "simulate": options.simulate})
        return FakeEngine(backend, state["log"], state["interrupt_after"])

    monkeypatch.setattr(measure, "start_engine", start)
    return state


def test_prompts_have_the_asked_length_and_share_no_prefix(fake: dict[str, Any], capsys) -> None:
    assert main(["bench", "-p", "cpu-only", "--tokens", "8", "--prompt-tokens", "40", "--repeats", "3",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    gens = [e for e in fake["log"] if "prompt" in e]
    assert len(gens) == 2 * (1 + 3)  # warm-up + 3 runs per backend
    assert all(g["prompt"] == 40 and g["shared"] == 0 for g in gens), gens
    llama, torch = out["candidates"]
    assert llama["decode_tok_s"] == {"median": 100.0, "min": 100.0, "max": 100.0, "n": 3}
    assert llama["prefill_tok_s"]["median"] == 1000.0 and torch["decode_tok_s"]["median"] == 50.0
    assert out["winner"] == "llama.cpp, CPU only"
    assert llama["measured_over_predicted"] == pytest.approx(100.0 / llama["predicted"]["decode_tok_s"], rel=1e-3)


def test_ctrl_c_keeps_and_records_what_was_measured(fake: dict[str, Any], capsys, _isolated_config: Path) -> None:
    fake["interrupt_after"] = 6  # llama.cpp: warm-up + 2 runs; torch: warm-up + 1 run, then Ctrl-C
    rc = main(["bench", "-p", "cpu-only", "--tokens", "8", "--prompt-tokens", "16", "--repeats", "2", "--record",
               "--json"])
    cap = capsys.readouterr()
    assert rc == 130 and "interrupted" in cap.err
    out = json.loads(cap.out)
    assert out["interrupted"] and [c["status"] for c in out["candidates"]] == ["done", "interrupted"]
    assert [len(c["runs"]) for c in out["candidates"]] == [2, 1]
    assert {"closed": "torch"} in fake["log"]  # the interrupted engine was closed
    prof = load_profile_file(_isolated_config / "profiles" / "cpu-only.toml")
    assert sorted((r.backend, r.repeats) for r in prof.results) == [("llama.cpp", 2), ("torch", 1)]


def test_simulate_runs_torch_only_and_never_records(fake: dict[str, Any], capsys) -> None:
    assert main(["bench", "-p", "dual-3090-nvlink-plus-3060", "--simulate", "--tokens", "4", "--prompt-tokens", "16",
                 "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {s["backend"] for s in fake["starts"]} == {"torch"} and all(s["simulate"] for s in fake["starts"])
    assert any("skipped under --simulate" in n for n in out["notes"])
    rc = main(["bench", "-p", "dual-3090-nvlink-plus-3060", "--simulate", "--record"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--simulate" in err


def test_gpu_profile_without_the_gpus_is_refused(fake: dict[str, Any], capsys, monkeypatch) -> None:
    from mixrun import run

    monkeypatch.setattr(run, "free_memory", lambda prof, c: run.FreeNow({}, tuple(d.id for d in c.devices)))
    rc = main(["bench", "-p", "dual-3090-nvlink-plus-3060", "--tokens", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "nothing to measure on this machine" in err
    assert fake["starts"] == []


@pytest.mark.parametrize(("args", "code", "words"), [
    (["--splits", "layer,diagonal"], 2, "--splits layer,diagonal: unknown split diagonal"),
    (["--splits", "tensor"], 3, "no candidate with split tensor"),
    (["--tokens", "1"], 2, "--tokens 1"),
    (["--prompt-tokens", "5000"], 2, "raise --ctx"),
])
def test_bad_input_one_line(fake: dict[str, Any], capsys, args: list[str], code: int, words: str) -> None:
    assert main(["bench", "-p", "cpu-only", *args]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
    assert fake["starts"] == []


def test_model_that_does_not_fit_exit_3(fake: dict[str, Any], capsys, llama70b: ModelSpec) -> None:
    assert main(["bench", llama70b.source, "-p", "cpu-only"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit cpu-only" in err and "short by" in err
    assert fake["starts"] == []


def test_failed_candidate_does_not_lose_the_others(fake: dict[str, Any], capsys, monkeypatch) -> None:
    real = measure.start_engine

    def start(model: str, candidate: Any, profile: Any, options: Any) -> FakeEngine:
        if candidate.backend == "torch":
            from mixrun.errors import MixrunError

            raise MixrunError("torch: no luck")
        return real(model, candidate, profile, options)

    monkeypatch.setattr(measure, "start_engine", start)
    assert main(["bench", "-p", "cpu-only", "--tokens", "4", "--prompt-tokens", "16", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "torch: no luck" in out and "winner: llama.cpp, CPU only" in out


# ---- benchmarks/run_all.py --------------------------------------------------------------------------------------


def test_run_all_docs_section_replaced_or_appended(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import run_all

    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro\n")
    rows = [{"name": "a", "setting": "fast", "result": "x | y", "seconds": 1.0}]
    info = {"date": "2026-01-01", "machine": run_all.machine(), "load_before": 1.0, "load_after": 2.0, "total_s": 3.0}
    run_all.update_docs(run_all.markdown(rows, info), doc)
    first = doc.read_text()
    assert first.startswith("# Benchmarks\n\nintro\n\n" + run_all.BEGIN) and first.rstrip().endswith(run_all.END)
    assert "| a | fast | x \\| y | 1 |" in first
    doc.write_text(first + "\n## later section\n")
    run_all.update_docs(run_all.markdown([{**rows[0], "result": "z"}], info), doc)
    second = doc.read_text()
    assert second.count(run_all.BEGIN) == 1 and "| a | fast | z | 1 |" in second and "x \\| y" not in second
    assert second.endswith("\n## later section\n")
    assert run_all.run_one(run_all.Bench("gone", [], "", str, 10, script="no_such.py"), 10, {})["status"] == "absent"


# ---- --record never loses the user's work ------------------------------------------------------------------------


def test_results_are_printed_when_the_record_fails(fake: dict[str, Any], capsys, monkeypatch,
                                                   _isolated_config: Path) -> None:
    import errno
    import os

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    rc = main(["bench", "-p", "cpu-only", "--tokens", "4", "--prompt-tokens", "16", "--repeats", "1", "--record",
               "--json"])
    cap = capsys.readouterr()
    errors = [ln for ln in cap.err.splitlines() if ln.startswith("mixrun: ")]  # the rest is progress
    assert rc == 2 and len(errors) == 1 and "Traceback" not in cap.err
    assert errors[0].endswith("cpu-only.toml: results not recorded: cannot write (No space left on device)")
    out = json.loads(cap.out)  # the measured figures came first
    assert out["candidates"][0]["decode_tok_s"]["median"] == 100.0
    folder = _isolated_config / "profiles"
    assert not list(folder.iterdir())  # no half-written profile, no temporary file


def _one(model: str) -> Any:
    from mixrun.rig.profile import Result

    return Result(model=model, split="none", backend="llama.cpp", decode_tok_s=10.0, source="measured")


def test_record_writes_through_a_symlink_keeps_the_mode_and_refuses_special_files(tmp_path: Path) -> None:
    import os
    import stat

    real = tmp_path / "rigs" / "mine.toml"
    real.parent.mkdir()
    save_profile(load_profile("cpu-only"), real)
    real.chmod(0o644)
    link = tmp_path / "link.toml"
    link.symlink_to(real)
    bench_record.record(str(link), [_one("a.gguf")])
    assert link.is_symlink() and stat.S_IMODE(real.stat().st_mode) == 0o644
    assert [r.model for r in load_profile_file(real).results][-1] == "a.gguf"
    assert sorted(p.name for p in real.parent.iterdir()) == ["mine.toml"]
    fresh = bench_record.record("cpu-only", [_one("b.gguf")])  # a bundled profile: copied to the user dir
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~mask
    dev = tmp_path / "dev.toml"
    dev.symlink_to("/dev/null")
    with pytest.raises(ProfileError, match=r"dev\.toml: not a regular file"):
        bench_record.record(str(dev), [_one("c.gguf")])
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_concurrent_records_lose_nothing(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "p.toml"
    save_profile(load_profile("cpu-only"), path)
    before = len(load_profile_file(path).results)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            bench_record.record(str(path), [_one(f"m{i}.gguf")])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    got = {r.model for r in load_profile_file(path).results}
    assert {f"m{i}.gguf" for i in range(8)} <= got and len(load_profile_file(path).results) == before + 8
