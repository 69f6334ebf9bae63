"""A tiny mixture of experts end to end: the Plan screen shows where each device's experts are and host RAM's bar,
and `mixrun plan`, `mixrun bench` and `mixrun chat` run it on the CPU (llama.cpp)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from textual.widgets import Input
from tui_helpers import asynctest, plain, wait_for

import gguf_factory
from mixrun.backends.base import Sampling
from mixrun.cli import main
from mixrun.model.gguf import read_spec
from mixrun.rig.profile import RigProfile, parse_profile
from mixrun.tui import make_app
from mixrun.tui.experts import expert_placement, layer_ranges
from mixrun.tui.plan_screen import PlanScreen
from mixrun.tui.run_screen import RunScreen
from mixrun.tui.widgets import MemoryBars


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny qwen3moe (2 layers, 4 experts) whose vocabulary ("t0".."t63") is made to spell "hi": token "t1" and the
    one merge "t 0" renamed in place to "hi" and "h i" (gguf_factory.speaking_hi)."""
    return gguf_factory.speaking_hi(
        gguf_factory.write_moe_model(tmp_path_factory.mktemp("tiny-moe") / "tiny-qwen3moe.gguf", "qwen3moe"))


def _small_gpu_rig() -> RigProfile:
    """One GPU with room for the dense part, KV, compute and one of the two layers' experts (its 400 MiB CUDA
    overhead included), and 64 GiB of host RAM: the planner sends one layer's experts to RAM."""
    devices = [{"id": "gpu0", "host": "h", "backend": "cuda", "name": "NVIDIA GeForce RTX 3060", "vram_gib": 0.39258,
                "mem_bandwidth_gbs": 360.0, "fp16_tflops": 25.6},
               {"id": "cpu", "host": "h", "backend": "cpu", "name": "Host CPU", "vram_gib": 64.0, "reserved_gib": 4.0,
                "mem_bandwidth_gbs": 60.0, "fp16_tflops": 1.0}]
    return parse_profile({"format": "mixrun-profile/1", "name": "tiny-gpu", "source": "user",
                          "hosts": [{"id": "h", "ram_gib": 64.0, "cpu_cores": 16, "pcie_gbs": 25.0}],
                          "devices": devices}, "tiny-gpu")


def test_layer_ranges() -> None:
    assert layer_ranges([7, 0, 1, 2, 5, 8]) == "0-2, 5, 7-8"
    assert layer_ranges([]) == ""


@asynctest
async def test_plan_screen_shows_experts_and_host_ram(tiny_moe: Path) -> None:
    app = make_app(str(tiny_moe), _small_gpu_rig(), 512)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, PlanScreen)
        cand = app.state.report.best
        assert cand is not None and cand.label.startswith("llama.cpp MoE") and cand.fits
        placed = expert_placement(read_spec(tiny_moe), cand)
        assert [(p.devices, p.layers, p.in_ram) for p in placed] == [(("gpu0",), (0, 1), (1,))]
        rig = plain(screen.query_one("#rig"))
        assert "gpu0: experts of 1/2 layers here" in rig and "layer 1 in host RAM" in rig and "idle: cpu" not in rig
        assert "host RAM: experts of 1/2 layers" in rig and "50% of the expert bytes" in rig
        bars = screen.query_one(MemoryBars).render().plain
        assert "cpu RAM " in bars and "/ 60.00 GiB" in bars  # host RAM (64 GiB less 4 reserved) has a bar
        assert "gpu0" in bars


@asynctest
async def test_plan_screen_cpu_only_has_all_experts_in_host_ram(tiny_moe: Path) -> None:
    app = make_app(str(tiny_moe), "cpu-only", 512)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        rig = plain(app.screen.query_one("#rig"))
        assert "cpu: experts of all 2 layers in host RAM" in rig
        assert "host RAM: experts of 2/2 layers" in rig and "100% of the expert bytes" in rig
        assert app.screen.query_one(MemoryBars).render().plain.startswith("cpu RAM ")


@asynctest
async def test_tui_runs_it_on_llama_cpp(tiny_moe: Path) -> None:
    """`r` on the Plan screen loads the real llama.cpp backend and answers; the tiny model speaks "t<n>" tokens."""
    app = make_app(str(tiny_moe), "cpu-only", 512, poll_s=0.1, sampling=Sampling(temperature=0, max_tokens=4))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("r")
        await wait_for(pilot, lambda: isinstance(app.screen, RunScreen), "the Run screen")
        screen = app.screen
        await wait_for(pilot, lambda: screen.engine_state == "ready", "the engine to load", timeout=30)
        prompt = screen.query_one("#prompt", Input)
        prompt.value = "hi"
        await prompt.action_submit()
        await wait_for(pilot, lambda: screen.answers == 1, "the answer", timeout=30)
        assert app.session.last.completion_tokens >= 1


def test_plan_bench_chat_on_cpu(tiny_moe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(tiny_moe), "-p", "cpu-only", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["arch"] == "qwen3moe" and out["candidates"][out["chosen"]]["fits"]
    assert main(["bench", str(tiny_moe), "-p", "cpu-only", "--tokens", "4", "--prompt-tokens", "8",
                 "--repeats", "1"]) == 0
    bench = capsys.readouterr().out
    assert "winner: " in bench and "failed" not in bench, bench  # every candidate measured
    assert main(["chat", str(tiny_moe), "-p", "cpu-only", "--backend", "llama.cpp", "--prompt", "hi",
                 "--max-tokens", "4", "--ctx", "512"]) == 0
