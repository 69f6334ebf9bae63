"""Telemetry snapshots: plain values a running engine hands to the chat ``/stats``, the TUI and ``mixrun bench``.

Engines count what they do (per-stage compute time, bytes all-reduced inside a TP group, bytes sent between
stages, tokens); :class:`mixrun.rig.sampler.DeviceSampler` adds what the hardware says as :class:`DeviceSample`
values. Counters are cumulative so a reader can difference two snapshots for rates. A metric that is not available
is ``None`` and renders as "n/a". Values only: reading the hardware is the rig layer's job.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DeviceSample:
    """One device now. ``memory_*`` in bytes; ``util_pct`` 0-100 (GPU utilization or the processes' CPU)."""

    id: str
    kind: str  # "cuda" | "cpu"
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    util_pct: float | None = None


@dataclass(frozen=True)
class LinkSample:
    """Bytes carried so far between two planned devices: ``tp`` all-reduce traffic or ``pipeline`` hand-offs."""

    between: tuple[str, str]
    kind: str  # "tp" | "pipeline"
    bytes_total: int


@dataclass(frozen=True)
class StageSample:
    """A pipeline stage: its devices, layers ``[start, end)`` and compute seconds of the last token and so far."""

    devices: tuple[str, ...]
    layers: tuple[int, int]
    last_token_s: float
    total_s: float


@dataclass(frozen=True)
class Snapshot:
    """Everything a monitor shows, at time ``t`` (``time.monotonic`` seconds)."""

    t: float
    backend: str
    tokens_total: int = 0  # tokens generated so far (all answers)
    decode_tok_s: float | None = None  # last answer's decode rate
    prefill_tok_s: float | None = None
    predicted_decode_tok_s: float | None = None
    predicted_prefill_tok_s: float | None = None
    devices: tuple[DeviceSample, ...] = ()
    links: tuple[LinkSample, ...] = ()
    stages: tuple[StageSample, ...] = ()

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def now() -> float:
    """A snapshot's time: ``time.monotonic`` seconds."""
    return time.monotonic()
