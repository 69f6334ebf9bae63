"""From a plan to a running engine: the one launch path for chat, bench and the TUI.

:func:`choose` turns a planner report into the candidate to run (refusing one that does not fit, unless forced;
falling back from a torch GPU plan the planner chose on a machine without CUDA). :func:`launch` re-checks that
candidate against the memory free now (preflight), hands the engine the rig profile (which maps its devices to this
machine's CUDA devices or CPU processes) and starts it. Backends are found through a static name table and imported
only when started, so ``mixrun plan`` never loads torch or llama.cpp.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mixrun.backends.base import Engine
from mixrun.errors import MixrunError
from mixrun.planner.types import Candidate, PlanReport
from mixrun.rig.probe import Nvml, host_available_bytes, normalize_bus_id
from mixrun.rig.profile import RigProfile
from mixrun.units import fmt_gib, shortfalls
from mixrun.vocab import Backend

# Backend -> "module:Engine class". The modules import torch or llama.cpp; they are imported on first use.
ENGINES = {
    Backend.LLAMACPP: "mixrun.backends.llamacpp:LlamaCppEngine",
    Backend.TORCH: "mixrun.backends.torch.engine:TorchEngine",
}


def engine_class(backend: Backend | str) -> type:
    """The Engine class of ``backend``; a name not in :data:`ENGINES` is refused with the known ones."""
    try:
        module, _, name = ENGINES[Backend(backend)].partition(":")
    except ValueError:
        raise MixrunError(f"{backend}: unknown backend (known: {', '.join(b.value for b in ENGINES)})") from None
    return getattr(importlib.import_module(module), name)


def _stderr(msg: str) -> None:
    print(f"mixrun: warning: {msg}", file=sys.stderr)


@dataclass(frozen=True)
class LaunchOptions:
    """How to start an engine, whatever its backend."""

    n_ctx: int = 4096
    n_threads: int | None = None
    seed: int | None = None
    simulate: bool = False  # torch: one CPU process stands in for each planned device
    force: bool = False  # load even when the memory free now says it will not fit (warn instead)
    debug: bool = False
    show_progress: bool = True  # draw load progress on a terminal
    warn: Callable[[str], None] = field(default=_stderr, compare=False)


@dataclass(frozen=True)
class Choice:
    """The candidate to run and what the user should be told about the choice."""

    candidate: Candidate | None
    notes: tuple[str, ...] = ()


def detect_here(**kwargs: Any) -> tuple[RigProfile, list[str]]:
    """This machine's profile (:func:`mixrun.rig.discover.detect`, same arguments), with what llama.cpp's CPU probe
    found for its host (run once per machine in a child process, then cached)."""
    from mixrun.backends.llamacpp_cpu import finding
    from mixrun.rig.discover import detect

    cpu = finding()
    prof, notes = detect(llamacpp_extra_buffers=cpu.buffer_types if cpu.extra_buffers else (), **kwargs)
    return prof, notes + cpu.notes()


def have_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def choose(report: PlanReport, model: str, *, force: bool = False, simulate: bool = False,
           cuda: Callable[[], bool] = have_cuda) -> Choice:
    """The report's chosen candidate, checked: one that does not fit is refused (``force`` runs the closest with a
    warning); a torch plan the planner picked itself (no ``--backend``) needs CUDA unless ``simulate``, so without
    it the best fitting llama.cpp candidate runs instead, and the note says why."""
    best, req = report.best, report.request
    notes: list[str] = []
    if best is None or not best.fits:
        closest = best or min(report.candidates, key=lambda c: sum(d.shortfall_bytes for d in c.devices),
                              default=None)
        short = "" if closest is None else shortfalls(closest.devices)
        hint = f" ({report.suggestions[0].what})" if report.suggestions else ""
        msg = (f"{model}: does not fit {report.profile} at context {req.ctx}"
               + (f": {closest.label}: {short}" if short else ""))
        if not force:
            raise MixrunError(msg + hint + "; --force loads it anyway")
        notes.append(f"warning: {msg}")
        best = closest
    if best is not None and best.backend == Backend.TORCH and req.backend is None and not simulate and not cuda():
        fallback = next((c for c in report.candidates if c.backend == Backend.LLAMACPP and c.fits), None)
        if fallback is not None:
            notes.append(f"the best plan ({best.label}) needs CUDA, which this machine lacks: running "
                         f"{fallback.label} (--backend torch --simulate runs the torch plan on CPU processes)")
            best = fallback
    return Choice(best, tuple(notes))


# ---- preflight: the plan against the memory free now ---------------------------------------------------------------


@dataclass(frozen=True)
class FreeNow:
    """Free bytes now per planned device id; devices of the plan this machine does not have are listed apart;
    ``misplaced`` says where a GPU of the profile is not the card CUDA will number as it."""

    free_bytes: dict[str, int]
    absent: tuple[str, ...]
    misplaced: tuple[str, ...] = ()


def free_memory(profile: RigProfile, plan: Candidate, nvml: Any = None,
                env: Mapping[str, str] | None = None) -> FreeNow:
    """Free bytes of the plan's devices on this machine now: NVML for GPUs, the OS's available memory for the CPU
    host. The first host's k-th GPU (:meth:`RigProfile.host_gpus`) is CUDA device k, as llama.cpp and torch number
    them (``CUDA_VISIBLE_DEVICES`` in ``env`` applies), read at its NVML index (:meth:`Nvml.cuda_to_nvml`). A device
    past the local count is absent; one NVML cannot read is left out. Where the profile records a GPU's PCI bus id
    and CUDA's k-th GPU here is on another bus, ``misplaced`` says so. ``nvml`` is an NVML module to use instead of
    ``pynvml`` (tests pass a double)."""
    gpus = [d.id for d in profile.host_gpus()]
    planned = [d.id for d in plan.devices]
    local: list[int | None] = []
    buses: list[str | None] = []
    if any(p in gpus for p in planned):
        with Nvml(nvml) as nv:
            order = nv.cuda_to_nvml(env)
            every = nv.free_bytes()
            local = [every[i] if i < len(every) else None for i in order]
            buses = [nv.bus_id(i) for i in order]
    free: dict[str, int] = {}
    absent: list[str] = []
    misplaced: list[str] = []
    for dev_id in planned:
        if profile.device(dev_id).backend == "cpu":
            free[dev_id] = host_available_bytes()
        elif dev_id in gpus and gpus.index(dev_id) < len(local):
            k = gpus.index(dev_id)
            want, here = profile.device(dev_id).pci_bus_id, buses[k]
            if want and here and normalize_bus_id(want) != here:
                misplaced.append(f"{dev_id} is the GPU at {normalize_bus_id(want)} in {profile.name}, but CUDA's "
                                 f"GPU {k} here is at {here}")
            if local[k] is not None:
                free[dev_id] = local[k]
        else:
            absent.append(dev_id)
    return FreeNow(free, tuple(absent), tuple(misplaced))


def preflight(profile: RigProfile, plan: Candidate, *, force: bool = False, nvml: Any = None,
              warn: Callable[[str], None] = lambda m: None) -> list[str]:
    """Refuse a plan that does not fit the memory free now (``force`` turns the refusal into a warning).

    The planner works from the profile's capacities; by the time a model loads, other programs may hold memory.
    Returns notes for the user (devices of the plan that are not on this machine). When none of the plan's GPUs is
    here the whole model runs in host memory, so the sum of the plan is checked against the host's free memory.
    """
    now = free_memory(profile, plan, nvml)
    notes, short = [], []
    for use in plan.devices:
        free = now.free_bytes.get(use.id)
        if free is not None and use.total_bytes > free:
            short.append(f"{use.id} needs {fmt_gib(use.total_bytes)}, {fmt_gib(free)} free now")
    if now.misplaced:
        notes.append("warning: " + "; ".join(now.misplaced) + " (CUDA_VISIBLE_DEVICES, or a profile of another "
                     "machine?): the plan's split follows CUDA's order")
    if now.absent:
        notes.append(f"{', '.join(now.absent)} of {profile.name} not found on this machine: running on what is here")
        if not any(d for d in now.free_bytes if profile.device(d).backend != "cpu"):
            need = sum(u.weights_bytes + u.kv_bytes + u.compute_bytes for u in plan.devices)
            avail = host_available_bytes()
            if need > avail:
                short.append(f"this machine's memory: needs {fmt_gib(need)}, {fmt_gib(avail)} free now")
    if short:
        msg = "does not fit the memory free now: " + "; ".join(short)
        if not force:
            raise MixrunError(msg + "; --force loads it anyway")
        warn(msg)
    return notes


# ---- launch --------------------------------------------------------------------------------------------------------


def launch(model: str, candidate: Candidate | None, profile: RigProfile | None,
           options: LaunchOptions = LaunchOptions(), *, backend: Backend | None = None) -> Engine:
    """Start the engine that runs ``candidate`` on ``profile``'s devices (``backend`` when there is no candidate).

    Before loading, the candidate is checked against the memory free on this machine now; with ``simulate`` the
    devices are CPU processes and nothing is checked. The preflight's notes are the engine's first notes."""
    backend = candidate.backend if candidate is not None else Backend(backend or Backend.LLAMACPP)
    notes: list[str] = []
    if candidate is not None and profile is not None and not options.simulate:
        notes = preflight(profile, candidate, force=options.force, warn=options.warn)
    cls = engine_class(backend)
    common: dict[str, Any] = {"n_ctx": options.n_ctx, "n_threads": options.n_threads, "seed": options.seed,
                              "plan": candidate, "show_progress": options.show_progress}
    if backend == Backend.TORCH:
        engine = cls(model, profile=profile, simulate=options.simulate, debug=options.debug, **common)
    else:
        engine = cls(model, **common)
    engine.info.notes[:0] = notes
    return engine


Launcher = Callable[..., Engine]  # the signature of :func:`launch`: tests stand in fakes for it
