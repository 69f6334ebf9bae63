"""The one largest-remainder allocator the planner (layers, KV heads) and the torch runtime (FFN and vocabulary
rows) share; ``tests/backends/test_torch_backend.py`` checks the runtime takes it, not a copy."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest

from mixrun.alloc import allocate, shares_of
from mixrun.planner import candidates, search


def test_allocate_largest_remainder() -> None:
    assert allocate(10, [1, 1, 1]) == [4, 3, 3]
    assert allocate(80, [62, 18]) == [62, 18]
    assert allocate(5, [100, 1, 1], minimum=1) == [3, 1, 1]
    assert allocate(3, [0.6667, 0.3333], 1) == [2, 1]
    assert allocate(1536, [2, 1]) == [1024, 512]
    assert allocate(49152, [1, 1, 1]) == [16384] * 3
    rng = random.Random(3)
    for _ in range(200):
        w = [rng.random() for _ in range(rng.randint(1, 6))]
        total = rng.randint(len(w), 100)
        got = allocate(total, w, minimum=1)
        assert sum(got) == total and min(got) >= 1
        quotas = [(total - len(w)) * Fraction(x) / sum(map(Fraction, w)) for x in w]
        assert all(abs(g - 1 - q) < 1 for g, q in zip(got, quotas, strict=True))  # every part within one of its quota


def test_allocate_on_awkward_inputs() -> None:
    # equal remainders are equal: 2 over [4, 1, 1] has quotas 4/3, 1/3, 1/3; in floats 4/3's remainder comes out
    # below 1/3's and the unit would go to index 1, compared exactly the tie goes to the lower index
    assert allocate(2, [4, 1, 1]) == [2, 0, 0]
    assert allocate(7, [2, 5, 2, 5]) == [1, 3, 1, 2]  # quotas 1, 2.5, 1, 2.5: the tie goes to the lower index
    assert allocate(4, [0, 0, 0]) == [2, 1, 1]  # no weight at all: evenly
    assert allocate(3, [0, 1e-300, 0], minimum=1) == [1, 1, 1]
    assert allocate(10, [0, 1e-300, 0]) == [0, 10, 0]  # tiny is not zero
    assert allocate(0, []) == []
    with pytest.raises(ValueError, match="cannot split 2 into 3 parts of at least 1"):
        allocate(2, [1, 1, 1], minimum=1)
    for bad in ([1, -1], [1, float("nan")], [float("inf"), 1]):
        with pytest.raises(ValueError, match="finite and at least 0"):
            allocate(4, bad)


def test_shares_of_counts() -> None:
    assert shares_of((2, 1)) == (2 / 3, 1 / 3)
    assert shares_of((1, 7)) == (0.125, 0.875)
    assert sum(shares_of((3, 3, 2))) == 1.0


def test_the_planner_has_no_allocator_of_its_own() -> None:
    assert search.allocate is allocate and candidates.allocate is allocate
