"""Search: TP groups (cliques of matched devices on fast links) and the assignment of contiguous layer ranges to
ordered groups that minimises predicted decode time under every device's memory.

The decode time of a pipeline is the sum of its stages' layer times plus the hand-offs between consecutive
stages, so the search splits into independent parts:
1. the stage order of a set of groups only changes the hand-off sum and which group is last (the last holds
   the output layer, and for torch the embedding): a Held-Karp DP gives the cheapest path (llama.cpp) or ring
   (torch: the last stage hands the next token back to the first) over every set of groups at once;
2. for a set and its last group, identical layers are placed optimally by filling the fastest groups first
   (an exchange argument: moving a layer to a faster group with room never costs more);
3. the winner is refined by an exact DP over layer boundaries with the true per-layer bytes and times.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mixrun.alloc import allocate, shares_of
from mixrun.rig.profile import Device, RigProfile

TP_LINKS = ("nvlink", "nvswitch", "pcie")  # inside one host; TP over a network is never worth its latency per layer


@dataclass(frozen=True)
class Unit:
    """A candidate pipeline stage: devices that do TP together, with each one's whole KV heads (one device: no TP,
    and ``kv_heads`` may stay empty, since it holds them all)."""

    devices: tuple[str, ...]
    kv_heads: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.kv_heads) != len(self.devices) and (self.kv_heads or len(self.devices) > 1):
            raise ValueError(f"unit {list(self.devices)}: KV heads {list(self.kv_heads)} must be one per device")

    @property
    def shares(self) -> tuple[float, ...]:
        """Each device's fraction of every sharded matrix and of the KV cache: its heads over all heads."""
        return shares_of(self.kv_heads) if self.kv_heads else (1.0,)


def matched(a: Device, b: Device) -> bool:
    """Devices TP can pair without one waiting on the other: same backend and product."""
    return a.backend == b.backend and a.name == b.name and abs(a.vram_gib - b.vram_gib) <= 0.05 * a.vram_gib


def tp_cliques(profile: RigProfile, min_link_gbs: float) -> list[tuple[str, ...]]:
    """Maximal sets (size >= 2) of matched GPUs joined pairwise by links inside one host (NVLink, NVSwitch or PCIe)
    of at least ``min_link_gbs`` (Bron-Kerbosch; a profile has few GPUs per host, so this is quick). Whether TP
    over a slow link pays is the cost model's call: TP over PCIe is slower than over NVLink, not forbidden."""
    gpus = [d for d in profile.devices if d.backend != "cpu"]
    adj: dict[str, set[str]] = {d.id: set() for d in gpus}
    for a, b in itertools.combinations(gpus, 2):
        link = profile.link(a.id, b.id)
        if link.kind in TP_LINKS and link.bandwidth_gbs >= min_link_gbs and matched(a, b):
            adj[a.id].add(b.id)
            adj[b.id].add(a.id)
    order = {d.id: i for i, d in enumerate(profile.devices)}
    out: list[tuple[str, ...]] = []

    def bk(r: set[str], p: set[str], x: set[str]) -> None:
        if not p and not x:
            if len(r) >= 2:
                out.append(tuple(sorted(r, key=order.__getitem__)))
            return
        pivot = max(p | x, key=lambda v: len(adj[v] & p))
        for v in list(p - adj[pivot]):
            bk(r | {v}, p & adj[v], x & adj[v])
            p = p - {v}
            x = x | {v}

    bk(set(), set(adj), set())
    return sorted(out, key=lambda c: (-len(c), order[c[0]]))


def kv_head_counts(weights: Sequence[float], n_kv_heads: int, even: bool) -> tuple[int, ...] | None:
    """Whole KV-head groups per device, at least one each: by largest remainder in proportion to ``weights``, or
    evenly; None when there are fewer groups than devices, or (``even``) when they do not divide evenly."""
    n = len(weights)
    if n_kv_heads < n:
        return None
    if even:
        return None if n_kv_heads % n else (n_kv_heads // n,) * n
    return tuple(allocate(n_kv_heads, weights, minimum=1))


# ---- choosing a set of stages, their order and their layer counts -----------------------------------------------


@dataclass(frozen=True)
class StageCosts:
    """What the search needs of one unit, in one position (last or not), from the caller's cost model."""

    layer_s: float  # seconds per average layer per token (compute + per-layer overhead + TP collectives)
    cap_layers: int  # how many average layers fit after the unit's fixed memory costs
    fixed_s: float  # seconds per token that do not depend on layers (e.g. the output projection when last)


def best_layout(units: Sequence[Unit], n_layers: int, *, cost: Callable[[int, bool], StageCosts | None],
                handoff_s: Callable[[int, int], float], allowed: Callable[[tuple[int, ...]], bool],
                first_only: frozenset[int] = frozenset(), cyclic: bool = False
                ) -> tuple[tuple[int, ...], list[int], float] | None:
    """The cheapest (order of unit indices, layer counts, seconds per token) over every set of disjoint units.

    ``cost(i, last)`` gives a unit's StageCosts as the last stage or not (None: it cannot take that position); ``handoff_s(i, j)`` the seconds to pass a token's hidden state from
    unit i to unit j; ``allowed(set)`` rejects sets (units sharing a device); units in ``first_only`` may only
    lead. ``cyclic``: the last stage hands the next token back to the first, so a layout is a cycle cut after
    its last stage, and any member may be last at the same hand-off cost.
    """
    n = len(units)
    if n == 0:
        return None
    inf = float("inf")
    full = 1 << n
    hand = [[handoff_s(i, j) if i != j else 0.0 for j in range(n)] for i in range(n)]
    bit = {d: k for k, d in enumerate(sorted({d for u in units for d in u.devices}))}
    dev_bits = [sum(1 << bit[d] for d in u.devices) for u in units]
    used = [0] * full  # devices of each set of units; sets whose units share a device are never built
    for mask in range(1, full):
        low = (mask & -mask).bit_length() - 1
        rest = used[mask & (mask - 1)]
        used[mask] = -1 if rest < 0 or rest & dev_bits[low] else rest | dev_bits[low]
    stage = {(i, last): cost(i, last) for i in range(n) for last in (False, True)}
    # paths[mask][end] = (hand-off seconds of the cheapest path over mask ending at end, previous unit); for a
    # cyclic layout every path starts at the lowest unit of its mask, so each mask's cycles are found exactly once.
    paths: list[dict[int, tuple[float, int]]] = [{} for _ in range(full)]
    for i in range(n):
        paths[1 << i][i] = (0.0, -1)
    for mask in range(1, full):
        if used[mask] < 0:
            continue
        low = (mask & -mask).bit_length() - 1
        for end, (c, _prev) in list(paths[mask].items()):
            for j in range(n):
                if mask >> j & 1 or j in first_only or (cyclic and j < low) or used[mask] & dev_bits[j]:
                    continue
                nm = mask | 1 << j
                cand = c + hand[end][j]
                if cand < paths[nm].get(j, (inf, 0))[0]:
                    paths[nm][j] = (cand, end)
    top: tuple[float, int, int, int, dict[int, int]] | None = None
    for mask in range(1, full):
        if used[mask] < 0 or not paths[mask]:
            continue
        members = tuple(i for i in range(n) if mask >> i & 1)
        if not allowed(members):
            continue
        if cyclic:
            low = members[0]
            ring = [(c + (hand[end][low] if len(members) > 1 else 0.0), end) for end, (c, _p) in paths[mask].items()
                    if end != low or len(members) == 1]
            if not ring:
                continue
            ring_s, ring_end = min(ring)
            options = [(ring_s, ring_end, last) for last in members]
        else:
            options = [(c, end, end) for end, (c, _p) in paths[mask].items()]
        for hand_s, end, last in options:
            counts = _fill(members, last, n_layers, stage)
            if counts is None:
                continue
            total = hand_s + counts[1] + counts[2]
            if top is None or total < top[0] - 1e-12:
                top = (total, mask, end, last, counts[0])
    if top is None:
        return None
    total, mask, end, last, per_unit = top
    order = _path(paths, mask, end)
    if cyclic:  # rotate the ring so that it ends at the chosen last stage
        k = order.index(last)
        order = order[k + 1:] + order[:k + 1]
    return tuple(order), [per_unit[i] for i in order], total


def _fill(members: tuple[int, ...], last: int, n_layers: int,
          stage: dict[tuple[int, bool], StageCosts | None]) -> tuple[dict[int, int], float, float] | None:
    """Fill the fastest members first, every member at least one layer; None if the layers do not fit."""
    sc: dict[int, StageCosts] = {}
    for i in members:
        c = stage[(i, i == last)]
        if c is None or c.cap_layers < 1:
            return None
        sc[i] = c
    if sum(c.cap_layers for c in sc.values()) < n_layers or len(members) > n_layers:
        return None
    counts = {i: 1 for i in members}
    left = n_layers - len(members)
    for i in sorted(members, key=lambda i: sc[i].layer_s):
        take = min(left, sc[i].cap_layers - 1)
        counts[i] += take
        left -= take
    if left:
        return None
    return counts, sum(counts[i] * sc[i].layer_s for i in members), sum(sc[i].fixed_s for i in members)


def _path(paths: list[dict[int, tuple[float, int]]], mask: int, end: int) -> list[int]:
    out = [end]
    while True:
        _c, prev = paths[mask][end]
        if prev < 0:
            break
        mask &= ~(1 << end)
        end = prev
        out.append(end)
    return out[::-1]


# ---- exact refinement over real per-layer figures ---------------------------------------------------------------


def exact_boundaries(n_layers: int, n_stages: int, stage_time: Callable[[int, int, int], float | None]
                     ) -> tuple[list[int], float] | None:
    """Exact DP over contiguous layer ranges for stages in a fixed order.

    ``stage_time(k, start, end)`` is stage k's seconds for layers ``[start, end)``, or None when they don't fit.
    Returns the stage boundaries ``[0, b1, ..., n_layers]`` and the summed stage time; each stage gets >= 1 layer.
    """
    inf = float("inf")
    dp = [[inf] * (n_layers + 1) for _ in range(n_stages + 1)]
    arg = [[-1] * (n_layers + 1) for _ in range(n_stages + 1)]
    dp[0][0] = 0.0
    for k in range(1, n_stages + 1):
        lo, hi = k, n_layers - (n_stages - k)
        for end in range(lo, hi + 1):
            bestv, besta = inf, -1
            for start in range(k - 1, end):
                prev = dp[k - 1][start]
                if prev == inf:
                    continue
                t = stage_time(k - 1, start, end)
                if t is None:
                    continue
                if prev + t < bestv:
                    bestv, besta = prev + t, start
            dp[k][end], arg[k][end] = bestv, besta
    if dp[n_stages][n_layers] == inf:
        return None
    bounds = [n_layers]
    end = n_layers
    for k in range(n_stages, 0, -1):
        end = arg[k][end]
        bounds.append(end)
    return bounds[::-1], dp[n_stages][n_layers]


def shift_descent(start: Sequence[float], steps: Sequence[float], floor: float,
                  score: Callable[[list], tuple[Any, Any]],
                  normalize: Callable[[list], list] = list) -> tuple[Any, list, Any]:
    """Local search over a split vector (``-ts`` shares, layer counts): for each step in turn, move ``step`` from one
    entry to another (never below ``floor``) while ``score`` improves. ``score(x)`` gives (a key, smaller is better;
    anything it computed on the way); ``normalize`` puts a moved vector in the form it is scored and kept in.
    Returns the best (key, vector, payload)."""
    best_x = normalize(list(start))
    best_key, best_payload = score(best_x)
    for step in steps:
        improved = True
        while improved:
            improved = False
            for i, j in itertools.permutations(range(len(best_x)), 2):
                if best_x[i] - step < floor:
                    continue
                x = list(best_x)
                x[i] -= step
                x[j] += step
                x = normalize(x)
                key, payload = score(x)
                if key < best_key:
                    best_key, best_x, best_payload, improved = key, x, payload, True
    return best_key, best_x, best_payload
