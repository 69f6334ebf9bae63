"""Human output for the CLI (rich): models, profiles and plans as tables. Byte counts become text through
:mod:`mixrun.units`."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mixrun.model.spec import ModelSpec
from mixrun.rig.profile import RigProfile
from mixrun.units import fmt_bytes
from mixrun.vocab import KVType


def safe(text: object) -> str:
    """Untrusted text (a GGUF's name, architecture, tensor names) made inert for a terminal: control and other
    non-printable characters (ESC/OSC sequences, bidi overrides) escaped as ``\\x1b``, and rich markup escaped."""
    from rich.markup import escape

    return escape("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text)))


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def render_spec(spec: ModelSpec, show_tensors: bool = False) -> None:
    from rich.table import Table

    con = _console()
    title = safe(spec.name or Path(spec.source).name)
    con.print(f"[bold]{title}[/]  [dim]{safe(spec.source)}"
              + (f" ({len(spec.files)} parts)" if len(spec.files) > 1 else ""))
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="dim")
    facts.add_column()
    rows = [
        ("architecture", safe(spec.arch) + ("" if spec.plannable else f"  [yellow]({safe(spec.not_plannable)})[/]")),
        ("file type", safe(spec.file_type or "n/a")),
        ("layers", str(spec.n_layers)),
        ("embedding", str(spec.n_embd)),
        ("heads / KV heads", f"{spec.n_head} / {spec.n_head_kv}  (head dim {spec.head_dim}"
                             + (f", V {spec.head_dim_v}" if spec.head_dim_v != spec.head_dim else "") + ")"),
        ("FFN", str(spec.n_ff)),
        ("vocabulary", f"{spec.n_vocab:,}  ({safe(spec.tokenizer_model or 'n/a')} tokenizer"
                       + (", chat template" if spec.has_chat_template else ", no chat template") + ")"),
        ("training context", f"{spec.n_ctx_train:,}"),
        ("RoPE", f"dim {spec.rope.dim}, base {spec.rope.freq_base:g}"
                 + (f", {safe(spec.rope.scaling_type)} x{spec.rope.scaling_factor:g}" if spec.rope.scaling_factor
                    else "")),
        ("output", "tied to token_embd" if spec.tied_output else "separate output.weight"),
        ("parameters", f"{spec.n_params / 1e9:.3f} B  ({spec.bits_per_weight:.2f} bits per weight)"),
        ("weights", f"{fmt_bytes(spec.total_bytes)}  ({spec.total_bytes:,} bytes; "
                    f"{fmt_bytes(sum(spec.other_bytes.values()))} outside layers)"),
        ("KV cache / token", "  ".join(f"{t} {fmt_bytes(spec.kv_bytes_per_token(t))}" for t in KVType)),
    ]
    if spec.sliding_window:
        n_swa = sum(kv.sliding for kv in spec.kv_layers)
        rows.append(("sliding window", f"{spec.sliding_window:,} on {n_swa} of {spec.n_layers} layers"))
    if spec.kv_lora_rank:
        rows.append(("KV cache (MLA)", f"latent {spec.kv_lora_rank} + rope {spec.head_dim - spec.kv_lora_rank} "
                                       "per token and layer, no V"))
    if spec.kv_note:
        rows.append(("KV note", f"[yellow]{safe(spec.kv_note)}[/]"))
    if spec.is_moe:
        rows += _moe_rows(spec)
    for k, v in rows:
        facts.add_row(k, v)
    con.print(facts)
    mix = Table(title="tensor types", title_justify="left", show_edge=False)
    mix.add_column("type")
    mix.add_column("tensors", justify="right")
    mix.add_column("bytes", justify="right")
    mix.add_column("share", justify="right")
    for qtype, (count, n_bytes) in spec.quant_mix().items():
        mix.add_row(qtype, str(count), fmt_bytes(n_bytes), f"{100 * n_bytes / spec.total_bytes:.1f}%")
    mix.add_row("[bold]total", f"[bold]{len(spec.tensors)}", f"[bold]{fmt_bytes(spec.total_bytes)}", "100%")
    con.print(mix)
    if show_tensors:
        t = Table(show_edge=False)
        for col in ("name", "type", "shape", "bytes"):
            t.add_column(col, justify="right" if col == "bytes" else "left")
        for ts in spec.tensors:
            t.add_row(safe(ts.name), ts.qtype, " x ".join(map(str, ts.shape)), f"{ts.n_bytes:,}")
        con.print(t)


def _moe_rows(spec: ModelSpec) -> list[tuple[str, str]]:
    """Experts, active parameters and the expert share of the bytes, for ``mixrun inspect``."""
    n_moe = sum(1 for b in spec.layer_expert_bytes if b)
    counts = f"{spec.n_expert} routed, {spec.n_expert_used} used per token"
    if spec.n_expert_shared:
        counts += f", {spec.n_expert_shared} shared"
    layers = f"{n_moe} of {spec.n_layers} layers"
    if spec.n_layer_dense_lead:
        layers += f" (first {spec.n_layer_dense_lead} dense)"
    if spec.n_layer_nextn:
        layers += f", {spec.n_layer_nextn} NextN/MTP"
    dense = spec.total_bytes - spec.expert_bytes
    return [
        ("experts", f"{counts}; FFN {spec.n_ff_exp} each; on {layers}"),
        ("active parameters", f"{spec.n_active_params / 1e9:.3f} B of {spec.n_params / 1e9:.3f} B per token"),
        ("expert bytes", f"{fmt_bytes(spec.expert_bytes)}  ({100 * spec.expert_share:.1f}% of the weights; "
                         f"dense part {fmt_bytes(dense)})"),
        ("decode reads / token", f"{fmt_bytes(spec.decode_read_bytes())}  (batch 1: dense + "
                                 f"{spec.n_expert_used}/{spec.n_expert} of the experts)"),
    ]


def render_profile_list(bundled: list[tuple[str, Any]], user: list[tuple[str, Path]], user_dir: Path) -> None:
    from rich.table import Table

    from mixrun.errors import ProfileError
    from mixrun.rig.profile import load_profile_file

    t = Table(show_edge=False)
    t.add_column("name", no_wrap=True)
    t.add_column("where", no_wrap=True)
    t.add_column("devices")
    t.add_column("description", ratio=1)
    user_names = {n for n, _ in user}
    for name, path in user:
        try:
            prof = load_profile_file(path)
            t.add_row(name, "user", _device_summary(prof), prof.description)
        except ProfileError as e:
            t.add_row(name, "user", "[red]invalid[/]", str(e))
    for name, entry in bundled:
        from importlib import resources

        with resources.as_file(entry) as p:
            prof = load_profile_file(p)
        where = "bundled (shadowed)" if name in user_names else "bundled"
        t.add_row(name, where, _device_summary(prof), prof.description)
    con = _console()
    con.print(t)
    con.print(f"[dim]user profiles: {user_dir}")


def _device_summary(prof: RigProfile) -> str:
    counts: dict[str, int] = {}
    for d in prof.devices:
        if d.backend != "cpu":
            short = d.name.replace("NVIDIA ", "").replace("GeForce ", "")
            counts[short] = counts.get(short, 0) + 1
    return ", ".join(f"{n}x {k}" for k, n in counts.items()) or "CPU only"


def render_profile(prof: RigProfile) -> None:
    from rich.table import Table

    con = _console()
    con.print(f"[bold]{prof.name}[/]  [dim]{prof.format}, {prof.source}")
    if prof.description:
        con.print(prof.description)
    if prof.hosts:
        h = Table(title="hosts", title_justify="left", show_edge=False)
        for col in ("id", "RAM", "cores", "PCIe GB/s", "network Gb/s"):
            h.add_column(col)
        for host in prof.hosts:
            h.add_row(host.id, f"{host.ram_gib:g} GiB" if host.ram_gib else "n/a", str(host.cpu_cores or "n/a"),
                      f"{host.pcie_gbs:g}", f"{host.network_gbps:g}")
        con.print(h)
    t = Table(title="devices", title_justify="left", show_edge=False)
    for col in ("id", "host", "backend", "name", "memory", "reserved", "GB/s", "TFLOP/s", "source"):
        t.add_column(col)
    for d in prof.devices:
        t.add_row(d.id, d.host or "-", d.backend, d.name, f"{d.vram_gib:g} GiB", f"{d.reserved_gib:g} GiB",
                  f"{d.mem_bandwidth_gbs:g}", f"{d.fp16_tflops:g}", d.source or prof.source)
    con.print(t)
    if prof.links:
        lt = Table(title="links", title_justify="left", show_edge=False)
        for col in ("between", "kind", "GB/s (one way)", "latency", "source"):
            lt.add_column(col)
        for link in prof.links:
            lt.add_row(" <-> ".join(link.between), link.kind, f"{link.bandwidth_gbs:g}",
                       f"{link.latency_us:g} us" if link.latency_us else "n/a", link.source or prof.source)
        con.print(lt)
    if prof.results:
        rt = Table(title="measured results", title_justify="left", show_edge=False)
        for col in ("model", "split", "backend", "decode tok/s", "prefill tok/s", "date"):
            rt.add_column(col)
        for r in prof.results:
            rt.add_row(r.model, r.split, r.backend or "n/a", f"{r.decode_tok_s:g}",
                       f"{r.prefill_tok_s:g}" if r.prefill_tok_s else "n/a", r.date or "n/a")
        con.print(rt)
    notes = prof.extra.get("notes") if isinstance(prof.extra, dict) else None
    if isinstance(notes, list):
        for n in notes:
            con.print(f"[dim]note: {n}")


@contextlib.contextmanager
def progress_status() -> Iterator[Callable[[str], None]]:
    """A spinner on stderr for steps that take more than a moment; plain lines when stderr is not a terminal."""
    if not sys.stderr.isatty():
        start = time.perf_counter()

        def plain(msg: str) -> None:
            print(f"[{time.perf_counter() - start:5.1f}s] {msg}", file=sys.stderr)

        yield plain
        return
    con = _console(stderr=True)
    with con.status("working") as status:
        yield lambda msg: status.update(msg)


def render_plan(report: Any, all_devices: bool = False) -> None:
    """Candidates ranked, the chosen one's devices and commands, and what would make a model fit."""
    from rich.table import Table

    con = _console()
    m = report.model
    req = report.request
    con.print(f"[bold]{Path(m['path']).name}[/] ({m['arch']}, {m['n_layers']} layers, {fmt_bytes(m['weights_bytes'])})"
              f" on [bold]{report.profile}[/], context {req.ctx:,}, KV {req.kv_type}"
              + (f", llama.cpp b{req.llamacpp_build}" if req.llamacpp_build is not None else ""))
    t = Table(show_edge=False)
    for col, just in (("#", "right"), ("candidate", "left"), ("fits", "left"), ("decode tok/s", "right"),
                      ("prefill tok/s", "right"), ("why", "left")):
        t.add_column(col, justify=just, overflow="fold")
    for i, c in enumerate(report.candidates):
        mark = "[bold green]>[/]" if i == report.chosen else str(i)
        fits = "[green]yes[/]" if c.fits else "[red]no[/]"
        dec = f"{c.decode_tok_s:.1f}" + (" [cyan]measured[/]" if c.measured else "")
        t.add_row(mark, c.label, fits, dec, f"{c.prefill_tok_s:.0f}", c.why)
    con.print(t)
    shown = list(report.candidates) if all_devices else ([report.best] if report.best else [])
    for c in shown:
        con.print(f"\n[bold]{c.label}[/] ({c.split.value}, {c.backend.value})")
        layers = {}
        for g in c.groups:
            for d in g.devices:
                layers[d] = f"{g.layers[0]}-{g.layers[1] - 1}" + (f" (TP {g.tp})" if g.tp > 1 else "")
        dt = Table(show_edge=False)
        for col in ("device", "layers", "weights", "KV", "compute", "overhead", "total", "capacity", "free"):
            dt.add_column(col, justify="left" if col in ("device", "layers") else "right")
        for d in c.devices:
            free = d.capacity_bytes - d.total_bytes
            style = "" if d.fits else "[red]"
            dt.add_row(d.id, layers.get(d.id, "-"), fmt_bytes(d.weights_bytes), fmt_bytes(d.kv_bytes),
                       fmt_bytes(d.compute_bytes), fmt_bytes(d.overhead_bytes), fmt_bytes(d.total_bytes),
                       fmt_bytes(d.capacity_bytes), f"{style}{fmt_bytes(free)}")
        con.print(dt)
        for name, cmd in c.commands.items():
            con.print(f"[dim]{name}:[/] {cmd}", soft_wrap=True)
        if c.llama_kwargs:
            con.print(f"[dim]llama_cpp.Llama kwargs:[/] {c.llama_kwargs}", soft_wrap=True)
    if report.best is None:
        con.print("\n[bold red]Nothing fits this rig.[/]")
    for s in report.suggestions:
        speed = f" ({s.decode_tok_s:.1f} tok/s)" if s.decode_tok_s else ""
        con.print(f"[yellow]suggestion:[/] {s.what}{speed}", soft_wrap=True)
    for n in report.notes:
        con.print(f"[dim]note: {n}")
