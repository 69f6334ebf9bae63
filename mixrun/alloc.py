"""Whole things shared out in proportion: layers over stages, KV heads over a TP group's devices, and the FFN and
vocabulary rows that follow the heads. The planner and the torch runtime both allocate here, so the integers a
plan carries and the shards a rank builds come from one piece of arithmetic. Standard library only: the planner
imports it and stays pure, the runtime imports it without importing the planner."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction


def allocate(total: int, weights: Sequence[float], minimum: int = 0) -> list[int]:
    """``total`` split into ``len(weights)`` integers in proportion to ``weights``, each at least ``minimum``.

    Largest remainder: what is left after the minimums is divided exactly (as fractions, so equal remainders are
    equal), each part takes the whole part of its quota, and the units still over go to the largest remainders,
    ties to the lower index. Weights that are all zero split evenly. Raises ValueError for a negative or
    non-finite weight, or a total too small for the minimums."""
    n = len(weights)
    rest = total - minimum * n
    if n == 0:
        if total:
            raise ValueError(f"cannot split {total} into no parts")
        return []
    if rest < 0:
        raise ValueError(f"cannot split {total} into {n} parts of at least {minimum}")
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"weights {list(weights)} must be finite and at least 0")
    exact = [Fraction(w) for w in weights]
    s = sum(exact)
    if s == 0:
        exact, s = [Fraction(1)] * n, Fraction(n)
    quotas = [rest * w / s for w in exact]
    parts = [math.floor(q) for q in quotas]
    for i in sorted(range(n), key=lambda i: (parts[i] - quotas[i], i))[: rest - sum(parts)]:
        parts[i] += 1
    return [minimum + p for p in parts]


def shares_of(counts: Sequence[int]) -> tuple[float, ...]:
    """Each count's fraction of their sum: a TP group's share of every sharded matrix from its KV heads."""
    total = sum(counts)
    return tuple(c / total for c in counts)
