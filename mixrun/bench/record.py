"""``mixrun bench --record``: turn measured candidates into the profile's ``[[results]]`` and write them atomically.

The profile written is the user's own: a bundled profile is copied into the user profile directory first under its
own name (which then shadows the bundled one), a user profile or a profile given by path is rewritten in place.
A new result replaces an earlier one of the same model file, split, backend, candidate and context; every other
result (hand-written ones included) is kept. The planner uses the last result that matches a candidate.

The read-modify-write holds a lock on the profile's folder, so two ``--record`` runs cannot lose one result. A
symlinked profile is written through (its target is updated, the link stays) and keeps its permission bits;
anything that is not a regular file is refused. Only the user profile folder is ever created.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mixrun import __version__
from mixrun.bench.results import BenchReport, Measured
from mixrun.errors import ProfileError, where
from mixrun.planner.cost import fit_corrections
from mixrun.planner.types import Candidate
from mixrun.rig import profile as _profile
from mixrun.rig.profile import Result, RigProfile


def results_of(rep: BenchReport, date: str | None = None) -> list[Result]:
    """One Result per measured candidate with a decode figure, and one per identical layout measured with it."""
    date = date or _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = []
    for m in rep.results:
        if m.decode is None:
            continue
        for c in _targets(m):
            try:
                out.append(_result(m, rep, c, date))
            except ValidationError:
                continue  # a figure outside the profile's bounds (0.00 tok/s after rounding) is no evidence
    return out


def _targets(m: Measured) -> list[Candidate]:
    return [m.candidate, *m.twins]


def _result(m: Measured, rep: BenchReport, c: Candidate, date: str) -> Result:
    d, p = m.decode, m.prefill
    assert d is not None
    runs = [r for r in m.runs if r.decode_tok_s > 0]
    return Result(model=Path(rep.model).name, split=c.split, backend=c.backend, label=c.label,
                  predicted_decode_tok_s=round(c.model_decode_tok_s, 2) or None,
                  predicted_prefill_tok_s=round(c.model_prefill_tok_s, 1) or None,
                  decode_tok_s=round(d.median, 2), decode_tok_s_min=round(d.lo, 2), decode_tok_s_max=round(d.hi, 2),
                  prefill_tok_s=round(p.median, 2) if p else None, prefill_tok_s_min=round(p.lo, 2) if p else None,
                  prefill_tok_s_max=round(p.hi, 2) if p else None, model_bytes=rep.model_bytes, ctx=rep.config.ctx,
                  prompt_tokens=max(r.prompt_tokens for r in m.runs),
                  decode_tokens=min(r.completion_tokens for r in runs), repeats=len(m.runs), date=date,
                  mixrun_version=__version__, source="measured",
                  # the model's decode time in two parts, and the devices: what fits the rig's correction
                  predicted_read_s=round(c.decode.compute_s, 9),
                  predicted_fixed_s=round(c.decode.tp_comm_s + c.decode.handoff_s + c.decode.overhead_s, 9),
                  devices=tuple(dict.fromkeys(d for g in c.groups for d in g.devices)))


def _key(r: Result) -> tuple[Any, ...]:
    return (r.model, r.split, r.backend, r.label, r.ctx)


def target_of(ref: str) -> tuple[Path, RigProfile]:
    """Where results for profile ``ref`` go, and the profile they are added to (re-read now, not when the bench
    started, so edits made meanwhile are kept)."""
    origin, kind = _profile.find_profile(ref)
    if kind == "bundled":
        return _profile.user_profile_dir() / f"{ref}.toml", _profile.load_profile(ref)
    return Path(origin), _profile.load_profile_file(origin)


def record(ref: str, new: list[Result]) -> Path:
    """Add ``new`` to profile ``ref`` (replacing earlier results of the same key) and write it atomically."""
    from mixrun.fsutil import dir_lock, write_problem

    if not new:
        raise ProfileError(where(ref, "nothing measured to record"))
    path, _ = _where_to(ref)
    folder = Path(os.path.realpath(path)).parent
    try:
        if folder == Path(os.path.realpath(_profile.user_profile_dir())):
            folder.mkdir(parents=True, exist_ok=True)
        with dir_lock(folder):
            path, prof = target_of(ref)  # read under the lock: another run's result, written meanwhile, is kept
            keys = {_key(r) for r in new}
            kept = [r for r in prof.results if _key(r) not in keys]
            data = prof.model_dump(mode="json", exclude_none=True)
            data["results"] = [r.model_dump(mode="json", exclude_none=True) for r in kept + new]
            # what every result recorded so far teaches (per backend and device set); other keys' are kept
            fitted = fit_corrections(kept + new)
            done = {(c.backend, tuple(sorted(c.devices))) for c in fitted}
            data["corrections"] = [c.model_dump(mode="json", exclude_none=True) for c in prof.corrections
                                   if (c.backend, tuple(sorted(c.devices))) not in done] \
                + [c.model_dump(mode="json", exclude_none=True) for c in fitted]
            updated = _profile.parse_profile(data, str(path))  # validate the whole profile before writing
            return _profile.save_profile(updated, path, parents=False)
    except OSError as e:
        raise ProfileError(where(path, f"results not recorded: {write_problem(e)}")) from None


def _where_to(ref: str) -> tuple[Path, str]:
    """The file results for ``ref`` go to, and its kind (as :func:`mixrun.rig.profile.find_profile`)."""
    origin, kind = _profile.find_profile(ref)
    return (_profile.user_profile_dir() / f"{ref}.toml" if kind == "bundled" else Path(origin)), kind
