"""Which kernel a CPU decode step's one-row products use, chosen by timing both on this machine.

A decode step multiplies one activation row by every weight matrix, so its speed is the rate at which those
products stream the weights. Two ways to compute ``x @ W.T`` for that row, both exact (the same float32 sums,
perhaps in another order: logits agree to 1e-5):

- ``linear``: ``F.linear`` (``torch.mm``), MKL's own product. On an Intel Xeon with AVX-512/AMX (a VM) it streamed
  26.1 GB/s, 2.5x the row blocks (10.5 GB/s).
- ``rowblock``: one batched product over a block of rows per thread (:class:`~mixrun.backends.torch.linear.Weight`).
  On an AMD EPYC MKL runs a lone matrix-vector product on one thread (14-16 GB/s on two cores) and a batch of them
  on all (25-35 GB/s).

Neither wins everywhere, so a CPU part measures them when it sets up its decode (:func:`choose`, called by
``Transformer.setup_cache``): both kernels over the part's own weights (the same share of every distinct shape,
about :data:`BUDGET_BYTES` a pass) on its threads, in interleaved rounds, median time: 0.1-0.4 s. A finding is
cached per machine (:func:`cache_key`: CPU model and flags, cores, torch version, threads, dtype, shapes, and the
variables that steer OpenMP and MKL) in ``torch-cpu-matvec.json`` under :func:`mixrun.fsutil.cache_dir`, read
defensively (any doubt about an entry means measuring again), but only when the machine was quiet: on a busy core
row blocks stall (0.6 GB/s on the EPYC while another process ran), which holds only while it is busy.
``MIXRUN_TORCH_CPU_MATVEC=linear|rowblock`` forces a kernel; anything else measures.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mixrun.rig.discover import cpu_info

LINEAR, ROWBLOCK = "linear", "rowblock"
KERNELS = (LINEAR, ROWBLOCK)
ENV = "MIXRUN_TORCH_CPU_MATVEC"
CACHE_FILE = "torch-cpu-matvec.json"
ROUNDS = 7  # timed passes per kernel, interleaved (ABBA), after one warm-up pass each
MIN_ROUNDS, MAX_SECONDS = 3, 1.0  # on a busy machine a pass can take 0.3 s: stop early, keep at least 3 rounds
STEADY = 1.25  # a quiet machine's passes of one kernel agree within 25% (outliers aside)
BUDGET_BYTES = 192 << 20  # weights per timed pass: past any last-level cache, 6-14 ms at 15-30 GB/s
CACHE_MIN_BYTES = 16 << 20  # smaller parts (test models) fit in a cache: measured each time, never cached
MARGIN = 1.03  # rowblock must beat linear by this much; a tie goes to linear, the plain operation
# environment variables that change how MKL and OpenMP run the products, hence part of the cache key
_STEERING = ("OMP_WAIT_POLICY", "OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY",
             "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE", "MKL_CBWR", "MKL_DYNAMIC", "MKL_NUM_THREADS")

# A timer runs one pass of a kernel (the callable) and returns its seconds; tests inject their own, and a count of
# preemptions (see :func:`preemptions`).
Timer = Callable[[str, Callable[[], None]], float]


@dataclass(frozen=True)
class Choice:
    """The kernel chosen, how (``forced`` by the variable or the caller, ``cached``, ``measured``), and the
    measured bandwidth of each kernel over the weights, GB/s (None when nothing was measured)."""

    kernel: str
    how: str
    linear_gbs: float | None = None
    rowblock_gbs: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "how": self.how, "linear_gbs": self.linear_gbs,
                "rowblock_gbs": self.rowblock_gbs}

    @classmethod
    def from_cache(cls, data: Any) -> Choice | None:
        """A cached entry, or None for anything but one this module wrote (the cache is not trusted)."""
        if not isinstance(data, dict) or data.get("kernel") not in KERNELS:
            return None
        gbs = [data.get("linear_gbs"), data.get("rowblock_gbs")]
        if not all(isinstance(g, float | int) and not isinstance(g, bool) and math.isfinite(g) and 0 < g < 1e5
                   for g in gbs):
            return None
        return cls(data["kernel"], "cached", float(gbs[0]), float(gbs[1]))

    def describe(self) -> str:
        """One line for notes and benchmarks, e.g. ``rowblock (measured: linear 15.2, rowblock 31.0 GB/s)``."""
        if self.linear_gbs is None or self.rowblock_gbs is None:
            return f"{self.kernel} ({self.how})"
        return f"{self.kernel} ({self.how}: linear {self.linear_gbs:.1f}, rowblock {self.rowblock_gbs:.1f} GB/s)"


def forced(env: Mapping[str, str]) -> str | None:
    """The kernel ``MIXRUN_TORCH_CPU_MATVEC`` forces, or None (unset or anything else: measure)."""
    value = env.get(ENV, "").strip().lower()
    return value if value in KERNELS else None


def cpu_chunks(rows: int, threads: int) -> int:
    """Row blocks of a ``rowblock`` product: one per thread (2 to 32 blocks measured on the 2-core EPYC: one per
    thread streams fastest), or 1 when the threads do not divide the rows."""
    return threads if threads > 1 and rows % threads == 0 else 1


def column(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """One row ``x`` (1, cols) as the column every row block of ``blocks`` (c, rows, cols) multiplies: (c, cols, 1)
    with strides (0, 1, cols), which MKL's batched product takes as it is (a contiguous column is 4x slower)."""
    c, _r, k = blocks.shape
    return x.as_strided((c, k, 1), (0, 1, k))


# ---- measuring ------------------------------------------------------------------------------------------------


def sample(mats: Sequence[torch.Tensor], threads: int, budget_bytes: int = BUDGET_BYTES) -> list[torch.Tensor]:
    """Matrices of ``mats`` to time: the same share of every distinct shape, evenly spaced, so that a pass reads
    about ``budget_bytes`` (at least one of each shape), in the model's order. A matrix larger than a quarter of
    the budget is cut to its first rows (a multiple of its row blocks' count, so both kernels take it as the
    model does): rows are independent, and a cut stays far larger than any cache."""
    total = sum(m.numel() * m.element_size() for m in mats)
    share = min(1.0, budget_bytes / total) if total else 1.0
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(mats):
        by_shape.setdefault(tuple(m.shape), []).append(i)
    keep: set[int] = set()
    for idx in by_shape.values():
        n = max(1, int(len(idx) * share))
        keep.update(idx[(j * len(idx)) // n] for j in range(n))
    out = []
    for i in sorted(keep):
        m = mats[i]
        rows, row_bytes = m.shape[0], m.shape[1] * m.element_size()
        if rows * row_bytes > budget_bytes // 4:
            c = cpu_chunks(rows, threads)
            cut = max(c, (budget_bytes // 4 // row_bytes) // c * c)
            m = m.narrow(0, 0, min(rows, cut))
        out.append(m)
    return out


def passes(mats: Sequence[torch.Tensor], threads: int) -> dict[str, Callable[[], None]]:
    """One pass of each kernel over ``mats``: every product exactly as :class:`~.step.DecodeStep` runs it
    (``torch.mm`` into a buffer; ``torch.bmm`` of the row blocks and the strided column into a buffer)."""
    dtype = mats[0].dtype if mats else torch.float32
    xs = {m.shape[1]: torch.ones(1, m.shape[1], dtype=dtype) for m in mats}
    ys = {m.shape[0]: torch.zeros(1, m.shape[0], dtype=dtype) for m in mats}
    lin = [(xs[m.shape[1]], m.t(), ys[m.shape[0]]) for m in mats]
    blk = []
    for m in mats:
        n, k = m.shape
        c = cpu_chunks(n, threads)
        blocks = m.view(c, n // c, k)
        blk.append((blocks, column(xs[k], blocks), ys[n].view(c, n // c, 1)))

    def linear() -> None:
        for x, wt, y in lin:
            torch.mm(x, wt, out=y)

    def rowblock() -> None:
        for w, col, y in blk:
            torch.bmm(w, col, out=y)

    return {LINEAR: linear, ROWBLOCK: rowblock}


def wall_timer(kernel: str, run: Callable[[], None]) -> float:
    """Seconds one pass takes, by the wall clock."""
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def preemptions() -> int:
    """Involuntary context switches of this process's threads so far: the scheduler took a core from them."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw


@dataclass(frozen=True)
class Measurement:
    """Seconds of each timed pass per kernel, the bytes a pass reads, and the preemptions during the passes."""

    seconds: dict[str, list[float]]
    n_bytes: int
    preempted: int

    def gbs(self) -> dict[str, float]:
        """Median GB/s of each kernel."""
        return {k: self.n_bytes / max(statistics.median(ts), 1e-9) / 1e9 for k, ts in self.seconds.items()}

    def quiet(self) -> bool:
        """Whether the machine left the passes alone: at most one preemption per pass, and each kernel's passes
        (less the fastest and the slowest) within :data:`STEADY` of each other. On a busy core row blocks stall
        whenever one of their threads waits for it (0.6-10 GB/s instead of 30 on the 2-core EPYC), which is true
        then and not what the machine does otherwise: such a finding is used, not cached."""
        passes = sum(len(ts) for ts in self.seconds.values())
        if self.preempted > passes:
            return False
        for ts in self.seconds.values():
            mid = sorted(ts)[1:-1] if len(ts) > 2 else ts
            if not mid or mid[-1] > STEADY * mid[0]:
                return False
        return True


def measure(mats: Sequence[torch.Tensor], threads: int, timer: Timer = wall_timer,
            switches: Callable[[], int] = preemptions, rounds: int = ROUNDS) -> Measurement:
    """Both kernels over ``mats`` (already sampled): one warm-up pass each, then up to ``rounds`` timed passes
    each, the order alternating (linear-rowblock, rowblock-linear, ...) so that drift and a neighbour's burst
    fall on both; after :data:`MIN_ROUNDS` rounds, no new round starts past :data:`MAX_SECONDS` of passes."""
    fns = passes(mats, threads)
    seconds: dict[str, list[float]] = {k: [] for k in KERNELS}
    with torch.inference_mode():
        for k in KERNELS:
            fns[k]()
        before = switches()
        for r in range(rounds):
            if r >= MIN_ROUNDS and sum(map(sum, seconds.values())) > MAX_SECONDS:
                break
            for k in (KERNELS if r % 2 == 0 else KERNELS[::-1]):
                seconds[k].append(timer(k, fns[k]))
        preempted = switches() - before
    return Measurement(seconds, sum(m.numel() * m.element_size() for m in mats), preempted)


def pick(gbs: Mapping[str, float]) -> str:
    """``rowblock`` where it streams at least :data:`MARGIN` times faster than ``linear``, else ``linear``."""
    return ROWBLOCK if gbs[ROWBLOCK] >= MARGIN * gbs[LINEAR] else LINEAR


# ---- the machine and the cache ----------------------------------------------------------------------------------


def cache_key(mats: Sequence[torch.Tensor], threads: int, env: Mapping[str, str]) -> str:
    """What changes the answer: the CPU (model, flags: a VM may hide AVX-512 or AMX), the cores, the torch build,
    the threads, the dtype and every distinct shape with its row blocks, and OpenMP/MKL settings."""
    name, flags = cpu_info()  # flags: a VM may hide AVX-512 or AMX
    shapes = sorted({(*m.shape, cpu_chunks(m.shape[0], threads)) for m in mats})
    ident = {"v": 1, "cpu": name, "flags": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16],
             "machine": platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
             "threads": threads, "dtype": str(mats[0].dtype) if mats else "", "shapes": shapes,
             "env": {k: env[k] for k in _STEERING if k in env}}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def choose(mats: Sequence[torch.Tensor], threads: int, *, env: Mapping[str, str] | None = None,
           timer: Timer = wall_timer, switches: Callable[[], int] = preemptions, use_cache: bool = True) -> Choice:
    """The kernel for one-row products over ``mats`` (a part's dense weights, (rows, cols) each) on ``threads``
    threads: forced by ``MIXRUN_TORCH_CPU_MATVEC``, else cached for this machine, else measured now. A finding is
    cached when the machine was quiet (:meth:`Measurement.quiet`) and the part is past :data:`CACHE_MIN_BYTES`. A
    cache that cannot be read or written means measuring."""
    env = os.environ if env is None else env
    kernel = forced(env)
    if kernel is not None:
        return Choice(kernel, "forced")
    if not mats:
        return Choice(LINEAR, "nothing to measure")
    from mixrun.fsutil import read_cache, write_cache

    cacheable = use_cache and sum(m.numel() * m.element_size() for m in mats) >= CACHE_MIN_BYTES
    key = cache_key(mats, threads, env) if cacheable else ""
    if cacheable:
        hit = Choice.from_cache(read_cache(CACHE_FILE).get(key))
        if hit is not None:
            return hit
    m = measure(sample(mats, threads), threads, timer, switches)
    gbs = m.gbs()
    quiet = m.quiet()
    found = Choice(pick(gbs), "measured" if quiet else "measured on a busy machine", round(gbs[LINEAR], 2),
                   round(gbs[ROWBLOCK], 2))
    if cacheable and quiet:
        name, _flags = cpu_info()
        write_cache(CACHE_FILE, key, {**found.to_json(), "cpu": name, "threads": threads,
                                      "torch": torch.__version__, "date": datetime.date.today().isoformat()})
    return found
