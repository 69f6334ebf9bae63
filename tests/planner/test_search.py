"""Search pieces alone: cliques, KV heads per device, the llama.cpp -ts mapping, the exact DP."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys

import pytest

from mixrun.planner.candidates import llamacpp_layer_map, ts_for_counts
from mixrun.planner.search import Unit, exact_boundaries, kv_head_counts, tp_cliques
from mixrun.rig.profile import load_profile


def test_planner_is_pure() -> None:
    code = ("import sys, mixrun.planner, mixrun.planner.candidates; "
            "print(sorted(m for m in ('torch', 'textual', 'pynvml', 'llama_cpp', 'mixrun.model.gguf', 'rich') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize(("name", "cliques"), [
    ("dual-3090-nvlink-plus-3060", [("gpu0", "gpu1")]),
    ("dual-3090-nvlink", [("gpu0", "gpu1")]),
    ("4x-3090-pcie", []),
    ("3090-plus-4090-pcie", []),
    ("two-hosts-2x3090-10gbe", []),
])
def test_tp_cliques(name: str, cliques: list) -> None:
    assert tp_cliques(load_profile(name), 40.0) == cliques


def test_nvswitch_clique_and_mixed_cards() -> None:
    assert [len(c) for c in tp_cliques(load_profile("8x-h100-sxm"), 40.0)] == [8]
    prof = load_profile("2x-a6000-nvlink-plus-a4000")
    (clique,) = tp_cliques(prof, 40.0)
    assert all("A6000" in prof.device(d).name for d in clique)


def test_kv_head_counts_uneven() -> None:
    assert kv_head_counts([1.0, 1.0], 3, even=False) == (2, 1)  # SmolLM2: 3 KV heads on 2 devices
    assert kv_head_counts([1.0, 1.0, 1.0], 3, even=True) == (1, 1, 1)
    assert kv_head_counts([936.0, 360.0], 8, even=False) == (5, 3)
    assert kv_head_counts([1.0] * 4, 3, even=False) is None
    assert kv_head_counts([1.0, 1.0], 3, even=True) is None
    for counts in (kv_head_counts([1.0, 1.0], 3, even=False), kv_head_counts([0.01, 1.0], 8, even=False)):
        assert counts is not None and all(type(k) is int for k in counts)


def test_unit_shares_are_its_heads_over_all_heads() -> None:
    assert Unit(("a", "b"), (2, 1)).shares == (2 / 3, 1 / 3)
    assert Unit(("a",)).shares == (1.0,)
    with pytest.raises(ValueError, match="one per device"):
        Unit(("a", "b"))
    with pytest.raises(ValueError, match="one per device"):
        Unit(("a", "b"), (3,))


@pytest.mark.parametrize("counts", [[40, 40], [62, 18], [1, 79], [30, 0, 50], [10, 20, 30, 20], [0, 80, 0]])
def test_ts_reproduces_layer_counts(counts: list[int]) -> None:
    """The -ts mixrun prints makes llama.cpp's own assignment give exactly the planned layer counts, with the
    output layer on the last GPU used."""
    prof = load_profile("4x-3090-pcie")
    gpus = [d for d in prof.devices if d.backend == "cuda"][: len(counts)]
    want = {g.id: c for g, c in zip(gpus, counts, strict=True)}
    mapping = llamacpp_layer_map(sum(counts), ts_for_counts(gpus, want))
    got = [mapping[:-1].count(i) for i in range(len(gpus))]
    assert got == counts
    assert mapping[-1] == max(i for i, c in enumerate(counts) if c)


def test_default_split_by_memory() -> None:
    # llama.cpp's default: 24+24+12 GiB -> 2/5, 2/5, 1/5 of 81 offloaded layers (80 + output)
    mapping = llamacpp_layer_map(80, [24, 24, 12])
    assert [mapping.count(i) for i in range(3)] == [33, 32, 16]


def test_exact_boundaries_matches_brute_force() -> None:
    rng = random.Random(7)
    for _ in range(30):
        L, k = rng.randint(3, 9), rng.randint(1, 3)
        if k > L:
            continue
        per = [[rng.uniform(0.5, 2.0) for _ in range(L)] for _ in range(k)]
        caps = [rng.randint(1, L) for _ in range(k)]

        def stage_time(s: int, a: int, b: int, per=per, caps=caps) -> float | None:
            return None if b - a > caps[s] else sum(per[s][a:b])

        got = exact_boundaries(L, k, stage_time)
        best = None
        for cuts in itertools.combinations(range(1, L), k - 1):
            bounds = [0, *cuts, L]
            ts = [stage_time(s, bounds[s], bounds[s + 1]) for s in range(k)]
            if None in ts:
                continue
            if best is None or sum(ts) < best[1] - 1e-12:
                best = (bounds, sum(ts))
        if best is None:
            assert got is None
        else:
            assert got is not None and got[1] == pytest.approx(best[1])
