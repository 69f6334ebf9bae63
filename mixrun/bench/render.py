"""What ``mixrun bench`` shows: a progress bar while it measures, then the table of candidates and the winner."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mixrun.bench.results import BenchConfig, BenchReport, Measured, Spread


@contextmanager
def progress_bar(results: list[Measured], cfg: BenchConfig) -> Iterator[Callable[[str, str], None]]:
    """One bar across all candidates (load, warm-up and each run are steps) on a terminal; plain lines otherwise."""
    per = 2 + cfg.repeats  # loaded, warm-up, runs
    total = per * len(results)
    if not sys.stderr.isatty():
        t0 = time.perf_counter()

        def plain(label: str, what: str) -> None:
            print(f"[{time.perf_counter() - t0:6.1f}s] {label}: {what}", file=sys.stderr)

        yield plain
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as prog:
        task = prog.add_task("bench", total=total)

        def update(label: str, what: str) -> None:
            prog.update(task, description=f"{label}: {what}", advance=0 if what == "loading" else 1)

        yield update


def _fmt_spread(s: Spread | None, digits: int = 1) -> str:
    if s is None:
        return "-"
    core = f"{s.median:.{digits}f}"
    return core if s.n == 1 else f"{core} ({s.lo:.{digits}f}-{s.hi:.{digits}f})"


def render_report(rep: BenchReport) -> None:
    """The table of candidates (median and min-max of the repeats, predicted, measured/predicted) and the winner."""
    from rich.console import Console
    from rich.table import Table

    con = Console(highlight=False)
    cfg = rep.config
    con.print(f"[bold]{Path(rep.model).name}[/] on [bold]{rep.profile}[/]{' (simulated)' if cfg.simulate else ''}: "
              f"prompt {cfg.prompt_tokens} tokens, decode {cfg.tokens} tokens, {cfg.repeats} runs each "
              f"(median, min-max), context {cfg.ctx:,}; x pred = measured / predicted decode")
    t = Table(show_edge=False)
    for col, just in (("candidate", "left"), ("split", "left"), ("runs", "right"), ("prefill tok/s", "right"),
                      ("decode tok/s", "right"), ("predicted", "right"), ("x pred", "right")):
        t.add_column(col, justify=just, overflow="fold")
    win = rep.winner
    for m in rep.results:
        c = m.candidate
        mark = "[bold green]> [/]" if m is win else ""
        state = {"failed": "[red]failed[/]", "interrupted": "[yellow]interrupted[/]", "pending": "[dim]not run[/]"}
        runs = f"{len(m.runs)}" + (f" {state[m.status]}" if m.status in state else "")
        ratio = m.ratio()
        pred = f"{c.decode_tok_s:.1f}" + (" [cyan](measured)[/]" if c.measured else "")
        t.add_row(mark + c.label, c.split.value, runs, _fmt_spread(m.prefill, 0),
                  _fmt_spread(m.decode), pred, f"{ratio:.2f}x" if ratio else "-")
    con.print(t)
    for m in rep.results:
        if m.error:
            con.print(f"[red]{m.candidate.label}: {m.error}[/]", soft_wrap=True)
    if win is not None:
        con.print(f"winner: [bold]{win.candidate.label}[/], {win.decode.median:.1f} tok/s decode"  # type: ignore
                  + (" (interrupted: of the candidates measured so far)" if rep.interrupted else ""))
    for n in rep.notes:
        con.print(f"[dim]note: {n}[/]", soft_wrap=True)
    if rep.recorded:
        con.print(f"recorded in {rep.recorded}")
