"""Plan and profile views as rich ``Text``/tables: pure functions of planner and profile values, no textual.

The widgets in :mod:`mixrun.tui.widgets` only place these on screen, so every picture here can be tested (and
read in a failing test) without running an app. Bytes become GiB only here and in :mod:`mixrun.render`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Group as RichGroup
from rich.table import Table
from rich.text import Text

from mixrun.planner.types import Candidate, PlanReport
from mixrun.rig.profile import Device, Link, RigProfile
from mixrun.units import fmt_bytes, shortfalls
from mixrun.vocab import shown

LINK_STYLE = {"nvlink": "bold green", "nvswitch": "bold green", "infiniband": "cyan", "pcie": "yellow",
              "thunderbolt": "yellow", "ethernet": "red"}
# memory parts, in bar order: (attribute of DeviceUse, glyph, style, legend name)
PARTS = (("weights_bytes", "█", "dodger_blue2", "weights"), ("kv_bytes", "█", "magenta", "KV"),
         ("compute_bytes", "█", "dark_orange", "compute"), ("overhead_bytes", "█", "grey50", "overhead"))


def short_name(dev: Device) -> str:
    """``NVIDIA GeForce RTX 3090`` -> ``RTX 3090``; a CPU device keeps its first words."""
    name = dev.name.replace("NVIDIA ", "").replace("GeForce ", "")
    return name if dev.backend != "cpu" else name.split(" (")[0]


def fmt_rate(bytes_per_s: float | None) -> str:
    """Bytes per second for people (``n/a`` when unknown)."""
    if bytes_per_s is None:
        return "n/a"
    return fmt_bytes(int(bytes_per_s)) + "/s"


def fmt_tok_s(v: float | None) -> str:
    """Tokens per second: one decimal below 1,000, none above (a 34-column panel has no room to spare)."""
    if v is None:
        return "n/a"
    return f"{v:,.0f}" if v >= 1000 else f"{v:,.1f}"


def link_text(link: Link) -> Text:
    return Text(f"{link.kind} {link.bandwidth_gbs:g} GB/s", style=LINK_STYLE.get(link.kind, ""))


def _fastest_link(profile: RigProfile, a: Sequence[str], b: Sequence[str]) -> Link:
    return max((profile.link(x, y) for x in a for y in b), key=lambda lk: lk.bandwidth_gbs)


def _slowest_link(profile: RigProfile, devs: Sequence[str]) -> Link | None:
    links = [profile.link(x, y) for i, x in enumerate(devs) for y in devs[i + 1:]]
    return min(links, key=lambda lk: lk.bandwidth_gbs) if links else None


def _dev_label(profile: RigProfile, dev_id: str) -> Text:
    d = profile.device(dev_id)
    return Text.assemble((dev_id, "bold"), (f" {short_name(d)} {d.vram_gib:g}G", "dim"))


def rig_diagram(profile: RigProfile, cand: Candidate | None, busy: frozenset[str] = frozenset()) -> Text:
    """The rig under one candidate: pipeline stages top to bottom, the TP group inside each with its link, the
    hand-off link between stages, idle devices, and every link the profile declares. ``busy`` devices are in no
    stage but not idle either (host RAM holding a mixture's experts)."""
    out = Text()
    hosts = {h.id: h for h in profile.hosts}
    if len(hosts) > 1:
        out.append("hosts: ", style="dim")
        out.append("  ".join(f"{h.id} ({h.network_gbps:g} Gb/s net)" for h in profile.hosts) + "\n")
    used: set[str] = set()
    groups = cand.groups if cand is not None else ()
    for i, g in enumerate(groups):
        if i:
            prev = groups[i - 1].devices
            lk = _fastest_link(profile, prev, g.devices)
            out.append("   │ ", style="dim")
            out.append_text(link_text(lk))
            out.append(f"  {lk.between[0]}→{lk.between[1]} hand-off\n" if lk.between[0] in prev
                       else f"  {lk.between[1]}→{lk.between[0]} hand-off\n", style="dim")
        n = g.n_layers
        out.append(f"stage {i + 1}" if len(groups) > 1 else "all layers", style="bold cyan")
        out.append(f"  layers {g.layers[0]}-{g.layers[1] - 1} ({n})  ")
        for j, d in enumerate(g.devices):
            if j:
                lk = profile.link(g.devices[j - 1], d)
                out.append(" ═ " if lk.kind in ("nvlink", "nvswitch") else " ─ ", style=LINK_STYLE.get(lk.kind, ""))
            out.append_text(_dev_label(profile, d))
            used.add(d)
        if g.tp > 1:
            slow = _slowest_link(profile, g.devices)
            shares = "/".join(f"{round(s * 100)}" for s in g.shares)
            out.append(f"\n   TP {g.tp}, shares {shares}%, slowest ", style="dim")
            if slow is not None:
                out.append_text(link_text(slow))
        out.append("\n")
    if cand is None:
        out.append("no candidate chosen: nothing to draw\n", style="yellow")
    idle = [d.id for d in profile.devices if d.id not in used and d.id not in busy]
    if idle and cand is not None:
        out.append("idle: ", style="dim")
        out.append(", ".join(idle) + "\n", style="dim")
    if profile.links:
        out.append("links: ", style="dim")
        for k, lk in enumerate(profile.links):
            if k:
                out.append(" · ", style="dim")
            out.append(f"{lk.between[0]}–{lk.between[1]} ")
            out.append_text(link_text(lk))
        out.append("\n")
    default = profile.hosts[0].pcie_gbs if profile.hosts else None
    if len([d for d in profile.devices if d.backend != "cpu"]) > 1 and default is not None:
        out.append(f"other GPU pairs: host PCIe {default:g} GB/s\n", style="dim")
    out.rstrip()
    return out


def memory_bar(use: Any, width: int) -> Text:
    """One device's planned bytes as a bar ``width`` cells wide: weights, KV, compute, overhead, then free.
    A part that holds bytes gets at least one cell; a device over capacity ends in red."""
    width = max(width, 4)
    cap = max(use.capacity_bytes, 1)
    scale = max(cap, use.total_bytes)
    cells = []
    for attr, glyph, style, _ in PARTS:
        n = getattr(use, attr)
        cells.append((max(1, round(n / scale * width)) if n > 0 else 0, glyph, style))
    while sum(c for c, _, _ in cells) > width:  # minimum cells can overflow a narrow bar: trim the largest
        k = max(range(len(cells)), key=lambda i: cells[i][0])
        cells[k] = (cells[k][0] - 1, cells[k][1], cells[k][2])
    bar = Text()
    for n, glyph, style in cells:
        bar.append(glyph * n, style=style if use.fits else "red")
    free = width - bar.cell_len
    bar.append("░" * free, style="grey35")
    return bar


def memory_bars(cand: Candidate | None, width: int, labels: dict[str, str] | None = None) -> Text:
    """A bar per device with ``used / capacity`` (or the shortfall), and a legend. ``labels`` names rows other
    than by device id (the host's ``cpu`` as ``cpu RAM`` for a mixture of experts)."""
    out = Text()
    if cand is None:
        return Text("no candidate chosen", style="yellow")
    labels = labels or {}
    id_w = max(len(labels.get(d.id, d.id)) for d in cand.devices)
    text_w = 24
    bar_w = max(8, width - id_w - text_w - 3)
    for d in cand.devices:
        out.append(f"{labels.get(d.id, d.id):<{id_w}} ", style="bold")
        out.append_text(memory_bar(d, bar_w))
        if d.fits:
            out.append(f" {fmt_bytes(d.total_bytes)} / {fmt_bytes(d.capacity_bytes)}")
        else:
            out.append(f" short by {fmt_bytes(d.shortfall_bytes)}", style="bold red")
        out.append("\n")
    for k, (_, glyph, style, name) in enumerate(PARTS):
        out.append(" " if k else "")
        out.append(glyph, style=style)
        out.append(f" {name}", style="dim")
    out.append(" ░ free", style="dim")
    return out


def memory_table(cand: Candidate) -> Table:
    """Every part per device in bytes, for the wide layout."""
    t = Table(show_edge=False, box=None, padding=(0, 1), header_style="dim")
    for col in ("device", "weights", "KV", "compute", "overhead", "total", "capacity"):
        t.add_column(col, justify="left" if col == "device" else "right", no_wrap=True)
    for d in cand.devices:
        total = Text(fmt_bytes(d.total_bytes), style="" if d.fits else "bold red")
        t.add_row(d.id, fmt_bytes(d.weights_bytes), fmt_bytes(d.kv_bytes), fmt_bytes(d.compute_bytes),
                  fmt_bytes(d.overhead_bytes), total, fmt_bytes(d.capacity_bytes))
    return t


def candidate_detail(report: PlanReport, index: int | None) -> Text:
    """Why the highlighted candidate looks as it does; when it does not fit, by how much on each device; when
    nothing fits, the planner's suggestions (each checked by planning again)."""
    out = Text()
    cand = report.candidates[index] if index is not None and 0 <= index < len(report.candidates) else None
    if cand is not None:
        out.append(f"{cand.label}", style="bold")
        out.append(f"  ({cand.split.value}, {cand.backend.value})", style="dim")
        if index == report.chosen:
            out.append("  chosen", style="bold green")
        out.append("\n")
        out.append(cand.why)
        if not cand.fits and "does not fit" not in cand.why:
            out.append(f"\ndoes not fit: {shortfalls(cand.devices, ', ')}", style="bold red")
    if report.best is None:
        req = report.request
        if any(c.fits for c in report.candidates):
            out.append(f"\nno candidate for split {shown(req.split)} / backend {shown(req.backend)}; "
                       "set them to auto to see the others", style="yellow")
        else:
            out.append(f"\nNothing fits {report.profile} at context {req.ctx:,} (KV {req.kv_type}).",
                       style="bold red")
    for s in report.suggestions:
        speed = f" ({s.decode_tok_s:.1f} tok/s)" if s.decode_tok_s else ""
        out.append("\nsuggestion: ", style="yellow")
        out.append(f"{s.what}{speed}")
    if report.suggestions:
        out.append("\na: apply the first context, KV or offload suggestion", style="dim")
    for n in report.notes:
        out.append(f"\nnote: {n}", style="dim")
    return out


def commands_text(cand: Candidate | None) -> Text:
    """The commands that reproduce a candidate (mixrun chat, llama-server) and llama-cpp-python's kwargs."""
    out = Text()
    if cand is None:
        return out
    for name, cmd in cand.commands.items():
        out.append(f"{name}: ", style="dim")
        out.append(f"{cmd}\n")
    if cand.llama_kwargs:
        out.append("llama_cpp.Llama: ", style="dim")
        out.append(", ".join(f"{k}={v!r}" for k, v in cand.llama_kwargs.items()))
    out.rstrip()
    return out


def profile_summary(profile: RigProfile) -> str:
    """``2x RTX 3090, 1x RTX 3060`` or ``CPU only``."""
    counts: dict[str, int] = {}
    for d in profile.devices:
        if d.backend != "cpu":
            counts[short_name(d)] = counts.get(short_name(d), 0) + 1
    return ", ".join(f"{n}x {k}" for k, n in counts.items()) or "CPU only"


def profile_detail(profile: RigProfile, origin: str) -> RichGroup:
    """Devices, links and recorded results of one profile."""
    head = Text.assemble((profile.name, "bold"), (f"  {origin}, {profile.source}\n", "dim"), profile.description)
    devs = Table(title="devices", title_justify="left", show_edge=False, box=None, padding=(0, 1),
                 header_style="dim")
    for col in ("id", "host", "name", "memory", "GB/s", "TFLOP/s"):
        devs.add_column(col, justify="right" if col in ("memory", "GB/s", "TFLOP/s") else "left")
    for d in profile.devices:
        devs.add_row(d.id, d.host or "-", short_name(d), f"{d.vram_gib:g} GiB", f"{d.mem_bandwidth_gbs:g}",
                     f"{d.fp16_tflops:g}")
    parts: list[Any] = [head, devs]
    if profile.links:
        links = Table(title="links", title_justify="left", show_edge=False, box=None, padding=(0, 1),
                      header_style="dim")
        for col in ("between", "kind", "GB/s", "latency"):
            links.add_column(col)
        for lk in profile.links:
            links.add_row(" ↔ ".join(lk.between), Text(lk.kind, style=LINK_STYLE.get(lk.kind, "")),
                          f"{lk.bandwidth_gbs:g}", f"{lk.latency_us:g} us" if lk.latency_us else "n/a")
        parts.append(links)
    if profile.results:
        res = Table(title="measured results", title_justify="left", show_edge=False, box=None, padding=(0, 1),
                    header_style="dim")
        for col in ("model", "split", "decode tok/s"):
            res.add_column(col)
        for r in profile.results:
            res.add_row(r.model, r.split, f"{r.decode_tok_s:g}")
        parts.append(res)
    notes = profile.extra.get("notes") if isinstance(profile.extra, dict) else None
    if isinstance(notes, list):
        parts.append(Text("\n".join(f"note: {n}" for n in notes), style="dim"))
    return RichGroup(*parts)


def _memory_of(profile: RigProfile, gpu: bool) -> int:
    return sum(d.capacity_bytes for d in profile.devices if (d.backend != "cpu") == gpu)


def compare_table(a: RigProfile, b: RigProfile, plan_a: PlanReport | None, plan_b: PlanReport | None) -> Table:
    """Two profiles side by side, with the best plan of the current model on each."""
    t = Table(show_edge=False, padding=(0, 1), header_style="bold", box=box.SIMPLE_HEAD)
    t.add_column("", no_wrap=True)
    t.add_column(a.name, overflow="fold")
    t.add_column(b.name, overflow="fold")

    def row(name: str, fn: Any) -> None:
        t.add_row(Text(name, style="dim"), fn(a, plan_a), fn(b, plan_b))

    row("devices", lambda p, _: profile_summary(p))
    row("GPU memory", lambda p, _: fmt_bytes(_memory_of(p, True)) if _memory_of(p, True) else "none")
    row("CPU memory", lambda p, _: fmt_bytes(_memory_of(p, False)))
    row("links", lambda p, _: ", ".join(sorted({f"{lk.kind} {lk.bandwidth_gbs:g}" for lk in p.links})) or "host PCIe")
    row("hosts", lambda p, _: str(max(len(p.hosts), 1)))
    row("best plan", lambda p, r: (r.best.label if r is not None and r.best is not None else "nothing fits"))
    row("decode tok/s", lambda p, r: fmt_tok_s(r.best.decode_tok_s) if r is not None and r.best else "n/a")
    row("prefill tok/s", lambda p, r: fmt_tok_s(r.best.prefill_tok_s) if r is not None and r.best else "n/a")
    return t
