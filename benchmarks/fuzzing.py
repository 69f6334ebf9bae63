"""What the fuzzers share: one ``mixrun`` command run in-process, measured, and judged by the probe's terms.

A clean failure is exit 2 with exactly one ``mixrun: ...`` line on stderr and no traceback, within a time and a
``tracemalloc`` peak bound; warnings are errors (a numpy overflow warning printed before mixrun's line is a second
line)."""

from __future__ import annotations

import contextlib
import io
import time
import tracemalloc
import warnings
from dataclasses import dataclass

from mixrun.cli import main


@dataclass
class Outcome:
    rc: int
    out: str
    err: str


def run_cli(args: list[str], within_s: float, peak_bytes: int | None) -> Outcome | str:
    """``mixrun ARGS`` in this process: its outcome, or what went wrong (an escaped exception, too slow, too big).
    ``peak_bytes`` None runs without ``tracemalloc``, which slows pure-Python work several times over."""
    out, err = io.StringIO(), io.StringIO()
    if peak_bytes is not None:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            warnings.simplefilter("error")
            rc = main(args)
    except BaseException as e:  # noqa: BLE001 - a fuzzer records every escape
        return f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        peak = tracemalloc.get_traced_memory()[1] if peak_bytes is not None else 0
        tracemalloc.stop()
    elapsed = time.perf_counter() - start
    if elapsed > within_s:
        return f"took {elapsed:.1f} s"
    if peak_bytes is not None and peak > peak_bytes:
        return f"tracemalloc peak {peak:,} bytes"
    return Outcome(rc, out.getvalue(), err.getvalue())


def one_clean_line(o: Outcome) -> str | None:
    """None when a failing command failed cleanly (exit 2, one ``mixrun:`` line, no traceback)."""
    if o.rc != 2 or o.err.count("\n") != 1 or not o.err.startswith("mixrun: ") or "Traceback" in o.err:
        return f"exit {o.rc}, stderr {o.err[:300]!r}"
    return None
