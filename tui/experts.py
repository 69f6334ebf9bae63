"""Where a mixture of experts' routed experts live under one candidate: per device, and in host RAM.

Read back from the candidate alone (its groups' layer ranges and llama.cpp's ``override_tensor`` regexes matched
against the model's tensor names), the way llama.cpp will apply them, so the screen shows what will run rather than
what the planner meant. Pure functions of planner and model values; bytes become GiB only in the text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from rich.text import Text

from mixrun.model.spec import ModelSpec
from mixrun.planner.types import Candidate
from mixrun.units import fmt_bytes

HOST = "CPU"  # llama.cpp's buffer type name for host RAM in an ``-ot`` override


@dataclass(frozen=True)
class DeviceExperts:
    """The routed experts of the layers a device (or a TP group) runs: which stay on it, which sit in host RAM."""

    devices: tuple[str, ...]
    layers: tuple[int, ...]  # the group's layers that have routed experts
    in_ram: tuple[int, ...]  # of those, the layers whose experts the overrides send to host RAM
    here_bytes: int
    ram_bytes: int
    host: bool  # the group runs on the host itself (its "device" is host RAM)


def _host_layers(spec: ModelSpec, overrides: Iterable[str]) -> set[int]:
    """Layers with a routed-expert tensor that an ``pattern=CPU`` override matches (re.search, as llama.cpp)."""
    pats = []
    for o in overrides:
        pat, _, target = str(o).rpartition("=")
        if pat and target.upper() == HOST:
            try:
                pats.append(re.compile(pat))
            except re.error:
                continue
    return {t.layer for t in spec.tensors
            if t.routed_expert and t.layer is not None and any(p.search(t.name) for p in pats)}


def expert_placement(spec: ModelSpec, cand: Candidate | None, cpu_ids: frozenset[str] = frozenset({"cpu"})
                     ) -> list[DeviceExperts]:
    """Per pipeline group, its routed experts on the group's devices vs in host RAM; empty for a dense model."""
    if cand is None or not spec.is_moe:
        return []
    per_layer = spec.layer_expert_bytes
    ram = _host_layers(spec, cand.llama_kwargs.get("override_tensor") or ())
    out = []
    for g in cand.groups:
        layers = tuple(i for i in range(*g.layers) if i < len(per_layer) and per_layer[i] > 0)
        host = all(d in cpu_ids for d in g.devices)
        in_ram = layers if host else tuple(i for i in layers if i in ram)
        ram_bytes = sum(per_layer[i] for i in in_ram)
        out.append(DeviceExperts(g.devices, layers, in_ram, sum(per_layer[i] for i in layers) - ram_bytes,
                                 ram_bytes, host))
    return out


def layer_ranges(layers: Iterable[int]) -> str:
    """``0, 1, 2, 5, 7, 8`` -> ``0-2, 5, 7-8``."""
    out: list[str] = []
    run: list[int] = []
    for i in sorted(set(layers)):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


def experts_text(spec: ModelSpec, cand: Candidate | None, cpu_ids: frozenset[str] = frozenset({"cpu"})) -> Text:
    """A line per group (``gpu0: experts of 1/2 layers here, layers 1 in host RAM``) and host RAM's share of all
    routed-expert bytes; empty for a dense model."""
    placed = expert_placement(spec, cand, cpu_ids)
    out = Text()
    if not placed:
        return out
    out.append("experts", style="bold cyan")
    out.append(f"  {spec.n_expert} per layer, routed\n", style="dim")
    for p in placed:
        out.append(",".join(p.devices), style="bold")
        n = len(p.layers)
        if p.host:
            out.append(f": experts of all {n} layers in host RAM ({fmt_bytes(p.ram_bytes)})\n")
            continue
        here = n - len(p.in_ram)
        out.append(f": experts of {here}/{n} layers here ({fmt_bytes(p.here_bytes)})")
        if p.in_ram:
            which = f"layer {p.in_ram[0]}" if len(p.in_ram) == 1 else f"layers {layer_ranges(p.in_ram)}"
            out.append(f"; {which} in host RAM ({fmt_bytes(p.ram_bytes)})", style="magenta")
        out.append("\n")
    ram = sum(p.ram_bytes for p in placed)
    total = ram + sum(p.here_bytes for p in placed)
    n_ram = sum(len(p.in_ram) for p in placed)
    n_all = sum(len(p.layers) for p in placed)
    out.append("host RAM", style="bold")
    out.append(f": experts of {n_ram}/{n_all} layers, {fmt_bytes(ram)}"
               f" ({ram / total:.0%} of the expert bytes)" if total else ": no experts")
    return out
