"""Byte counts as people read them: the one place bytes become KiB/MiB/GiB text, for the CLI, the TUI and error
messages alike. Everything else keeps bytes as ints (STYLE §5)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

GIB = 1 << 30
MIB = 1 << 20


def fmt_bytes(n: int | None) -> str:
    """``n`` bytes in the largest unit it reaches (``1.50 GiB``, ``12.0 MiB``, ``512 B``); None is "n/a"."""
    if n is None:
        return "n/a"
    if abs(n) >= GIB:
        return f"{n / GIB:.2f} GiB"
    if abs(n) >= MIB:
        return f"{n / MIB:.1f} MiB"
    if abs(n) >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} B"


def fmt_gib(n: int) -> str:
    """``n`` bytes in GiB with two decimals, whatever its size (memory needs and shortfalls, compared side by side)."""
    return f"{n / GIB:.2f} GiB"


class Short(Protocol):
    """A planned device's memory verdict (:class:`mixrun.planner.types.DeviceUse` is one)."""

    @property
    def id(self) -> str: ...
    @property
    def fits(self) -> bool: ...
    @property
    def shortfall_bytes(self) -> int: ...


def short_by(what: str, shortfall_bytes: int) -> str:
    """``gpu1 short by 2.50 GiB``: how much more memory ``what`` would need."""
    return f"{what} short by {fmt_gib(shortfall_bytes)}"


def shortfalls(devices: Iterable[Short], sep: str = "; ") -> str:
    """Every device that does not fit, with what it is short by, joined by ``sep`` ("" when all fit)."""
    return sep.join(short_by(d.id, d.shortfall_bytes) for d in devices if not d.fits)
