"""``mixrun bench``: choose the candidates, measure them, print, and record."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mixrun.bench.measure import run_bench
from mixrun.bench.results import SPLIT_NAMES, BenchConfig, BenchReport, Measured, NothingToBench
from mixrun.errors import MixrunError
from mixrun.units import shortfalls
from mixrun.vocab import AUTO

# ---- which candidates -------------------------------------------------------------------------------------------


def parse_splits(text: str | None) -> set[str] | None:
    """``--splits layer,tensor`` -> {"layer", "tensor"}; None (all) when not given or ``auto``."""
    if not text or text == AUTO:
        return None
    out = {s.strip() for s in text.split(",") if s.strip()}
    bad = sorted(out - set(SPLIT_NAMES))
    if bad or not out:
        raise MixrunError(f"--splits {text}: unknown split {', '.join(bad) or '(empty)'} "
                          f"(known: {', '.join(SPLIT_NAMES)})")
    return out


def _layout_key(c: Any) -> tuple[Any, ...]:
    return (c.backend.value, tuple((g.devices, g.layers, g.kv_heads or tuple(round(s, 4) for s in g.shares))
                                   for g in c.groups))


def select(report: Any, splits: set[str] | None, backend: str, simulate: bool,
           absent: Callable[[Any], tuple[str, ...]] = lambda c: ()) -> tuple[list[Measured], list[str]]:
    """The candidates to run, one per distinct layout, and notes on what was left out and why.

    ``absent(candidate)`` names the candidate's devices this machine lacks (not asked under ``--simulate``).
    Raises :class:`NothingToBench` when none of the asked-for candidates fits, MixrunError when none can run here.
    """
    notes: list[str] = []
    pool = [c for c in report.candidates if (splits is None or c.split.value in splits)
            and (backend == AUTO or c.backend.value == backend)]
    if not pool:
        what = ", ".join(x for x in (f"split {'/'.join(sorted(splits))}" if splits else "",
                                     f"backend {backend}" if backend != AUTO else "") if x)
        raise NothingToBench(f"{report.profile}: no candidate with {what} (the planner offers: "
                             + "; ".join(f"{c.label} ({c.split.value}, {c.backend.value})" for c in report.candidates)
                             + ")")
    fitting = [c for c in pool if c.fits]
    if not fitting:
        c = min(pool, key=lambda c: sum(d.shortfall_bytes for d in c.devices))
        short = shortfalls(c.devices)
        hint = f" ({report.suggestions[0].what})" if getattr(report, "suggestions", ()) else ""
        raise NothingToBench(f"{Path(report.model['path']).name}: does not fit {report.profile} at context "
                             f"{report.request.ctx:,}: {c.label}: {short}{hint}")
    for c in pool:
        if not c.fits:
            notes.append(f"{c.label}: does not fit, not run")
    chosen: dict[tuple[Any, ...], Measured] = {}
    for c in fitting:
        if simulate and c.backend.value == "llama.cpp":
            notes.append(f"{c.label}: skipped under --simulate (llama.cpp would run on this machine's CPU, so its "
                         "figure would say nothing about the rig)")
            continue
        missing = () if simulate else absent(c)
        if missing:
            notes.append(f"{c.label}: {', '.join(missing)} not on this machine, not run "
                         "(--simulate runs the torch candidates on CPU processes)")
            continue
        key = _layout_key(c)
        if key in chosen:
            m = chosen[key]
            m.twins += (c,)
            notes.append(f"{c.label}: the same layout as {m.candidate.label}, measured once")
        else:
            chosen[key] = Measured(c)
    if not chosen:
        raise MixrunError(f"{report.profile}: nothing to measure on this machine: " + "; ".join(notes))
    return list(chosen.values()), notes


# ---- the command ------------------------------------------------------------------------------------------------


def bench_command(model: str, profile_ref: str, cfg: BenchConfig, *, splits: str | None = None,
                  backend: str = AUTO, record: bool = False, as_json: bool = False, debug: bool = False) -> int:
    """Plan, measure, print, and with ``record`` write the results into the profile. Exit code: 0, 1 when no
    candidate could be measured, 130 after Ctrl-C (what was measured is still printed and recorded)."""
    import json

    from mixrun.model.gguf import read_spec
    from mixrun.planner import PlanRequest, plan
    from mixrun.rig.profile import load_profile
    from mixrun.run import free_memory

    cfg.check()
    if record and cfg.simulate:
        raise MixrunError("--record with --simulate: simulated runs measure CPU processes, not the rig's devices, "
                          "so they are not recorded")
    wanted = parse_splits(splits)
    profile = load_profile(profile_ref)
    spec = read_spec(model)
    if not Path(model).is_file():
        raise MixrunError(f"{model}: bench runs the model, so it needs a local .gguf file")
    report = plan(profile, spec, PlanRequest(ctx=cfg.ctx))
    chosen, notes = select(report, wanted, backend, cfg.simulate, absent=lambda c: free_memory(profile, c).absent)
    rep = BenchReport(model=model, model_bytes=spec.file_bytes, profile=profile.name, config=cfg, results=chosen,
                      notes=notes)
    from mixrun.bench.render import progress_bar, render_report

    with progress_bar(chosen, cfg) as step:
        run_bench(rep, profile, step, debug=debug)
    unrecorded: MixrunError | None = None
    if record:
        from mixrun.bench.record import record as record_results
        from mixrun.bench.record import results_of

        results = results_of(rep)
        try:
            if results:
                rep.recorded = str(record_results(profile_ref, results))
            else:
                rep.notes.append("nothing was measured, so nothing was recorded")
        except MixrunError as e:
            unrecorded = e  # the measured figures are printed first: a failed write must not lose the run
    if as_json:
        sys.stdout.write(json.dumps(rep.to_json(), indent=2) + "\n")
    else:
        render_report(rep)
    if unrecorded is not None:
        print(f"mixrun: {unrecorded}", file=sys.stderr)
        return 130 if rep.interrupted else unrecorded.exit_code
    if rep.interrupted:
        print("mixrun: interrupted: kept the figures measured so far", file=sys.stderr)
        return 130
    if rep.winner is None:
        errors = "; ".join(f"{m.candidate.label}: {m.error}" for m in rep.results if m.error)
        print(f"mixrun: no candidate could be measured{': ' + errors if errors else ''}", file=sys.stderr)
        return 1
    return 0
