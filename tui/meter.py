"""Live figures from two telemetry samples: rates by differencing cumulative counters, and the panel text.

Pure functions of :class:`~mixrun.tui.session.Sample` values; the Run screen only places the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.text import Text

from mixrun.tui.session import Sample
from mixrun.tui.views import fmt_rate, fmt_tok_s
from mixrun.units import fmt_bytes


@dataclass(frozen=True)
class Rates:
    """Per second between two samples: tokens, and bytes per (link, kind)."""

    tok_s: float = 0.0
    link_bytes_s: dict[tuple[str, str, str], float] = field(default_factory=dict)


def rates(prev: Sample | None, cur: Sample) -> Rates:
    """Differences of cumulative counters over the time between the samples (zero on the first sample, or when a
    counter went backwards because a new engine started)."""
    if prev is None:
        return Rates()
    dt = cur.t - prev.t
    if dt <= 0:
        return Rates()
    tok = max(cur.tokens_total - prev.tokens_total, 0) / dt
    before = {(*lk.between, lk.kind): lk.bytes_total for lk in prev.snapshot.links}
    links = {}
    for lk in cur.snapshot.links:
        key = (*lk.between, lk.kind)
        links[key] = max(lk.bytes_total - before.get(key, lk.bytes_total), 0) / dt
    return Rates(tok, links)


def _ratio(measured: float | None, predicted: float | None) -> str:
    if not measured or not predicted:
        return ""
    return f"{100 * measured / predicted:.0f}%"


def speed_text(cur: Sample, r: Rates, plan: Any) -> Text:
    """Tokens so far, the current rate, and predicted vs measured decode and prefill tok/s."""
    snap = cur.snapshot
    pred_dec = snap.predicted_decode_tok_s or (plan.decode_tok_s if plan is not None else None)
    pred_pre = snap.predicted_prefill_tok_s or (plan.prefill_tok_s if plan is not None else None)
    out = Text()
    out.append("tokens ", style="dim")
    out.append(f"{cur.tokens_total:,}", style="bold")
    out.append("  now ", style="dim")
    out.append(f"{r.tok_s:.1f} tok/s", style="bold")
    if cur.generating:
        out.append("  ●", style="green")
    out.append(f"\n{'tok/s':<7}{'predict':>8} {'measured':>8}\n", style="dim")
    for name, pred, meas in (("decode", pred_dec, cur.decode_tok_s), ("prefill", pred_pre, cur.prefill_tok_s)):
        out.append(f"{name:<7}{fmt_tok_s(pred):>8} ")
        out.append(f"{fmt_tok_s(meas):>8}", style="bold")
        out.append(f" {_ratio(meas, pred):>4}\n", style="dim")
    out.rstrip()
    return out


def devices_text(cur: Sample, plan: Any) -> Text:
    """Memory and utilization per device, next to what the plan put there."""
    planned = {d.id: d.total_bytes for d in plan.devices} if plan is not None else {}
    out = Text()
    for d in cur.snapshot.devices:
        out.append(f"{d.id} ", style="bold")
        out.append(f"{fmt_bytes(d.memory_used_bytes)}")
        if d.memory_total_bytes:
            out.append(f" / {fmt_bytes(d.memory_total_bytes)}", style="dim")
        util = "n/a" if d.util_pct is None else f"{d.util_pct:.0f}%"
        out.append(f"\n  {'cpu' if d.kind == 'cpu' else 'util'} {util}")
        if d.id in planned:
            out.append(f" · planned {fmt_bytes(planned[d.id])}", style="dim")
        out.append("\n")
    if not cur.snapshot.devices:
        out.append("no device figures from this backend", style="dim")
    out.rstrip()
    return out


def links_text(cur: Sample, r: Rates, totals: bool = False) -> Text:
    """Traffic per link: bytes per second now (and in total, where there is room)."""
    out = Text()
    for lk in cur.snapshot.links:
        a, b = lk.between
        out.append(f"{a}↔{b} ", style="bold")
        out.append(f"{'pipe' if lk.kind == 'pipeline' else lk.kind} ", style="dim")
        out.append(f"{fmt_rate(r.link_bytes_s.get((a, b, lk.kind)))}")
        out.append(f"  total {fmt_bytes(lk.bytes_total)}\n" if totals else "\n", style="dim")
    if not cur.snapshot.links:
        out.append(f"none reported by {cur.snapshot.backend}", style="dim")
    out.rstrip()
    return out


def stages_text(cur: Sample, totals: bool = False) -> Text:
    """Compute time per pipeline stage: the last token's (and the total so far, where there is room)."""
    out = Text()
    for s in cur.snapshot.stages:
        out.append(f"{'+'.join(s.devices)} ", style="bold")
        out.append(f"L{s.layers[0]}-{s.layers[1] - 1} ", style="dim")
        out.append(f"{s.last_token_s * 1000:.2f} ms/tok")
        out.append(f"  total {s.total_s:.1f} s\n" if totals else "\n", style="dim")
    if not cur.snapshot.stages:
        out.append(f"none reported by {cur.snapshot.backend}", style="dim")
    out.rstrip()
    return out
