"""The search against an exhaustive enumeration under the same cost model, on randomized rigs."""

from __future__ import annotations

import itertools
import random

import pytest

from mixrun.model.spec import ModelSpec
from mixrun.planner.candidates import SPLIT_MARGIN, torch_plan, torch_units
from mixrun.planner.evaluate import Context, evaluate_pipeline
from mixrun.planner.memory import ModelFacts
from mixrun.planner.types import Group, PlanRequest
from mixrun.rig.profile import FORMAT, Device, Link, RigProfile

CARDS = [("RTX 3090", 24.0, 936.0, 71.0), ("RTX 3060", 12.0, 360.0, 25.6), ("RTX 4090", 24.0, 1008.0, 165.0),
         ("Tesla P40", 24.0, 346.0, 11.8), ("RTX A4000", 16.0, 448.0, 76.7)]


def random_rig(rng: random.Random, n: int, scale: float) -> RigProfile:
    """n GPUs of a few kinds (memory scaled down to the test model's size), NVLink between some matched pairs."""
    devices = []
    for i in range(n):
        name, vram, bw, tf = rng.choice(CARDS[: rng.randint(2, len(CARDS))])
        devices.append(Device(id=f"gpu{i}", backend="cuda", name=name, vram_gib=vram * scale, mem_bandwidth_gbs=bw,
                              fp16_tflops=tf))
    links = []
    for a, b in itertools.combinations(devices, 2):
        if a.name == b.name and rng.random() < 0.6:
            links.append(Link(between=(a.id, b.id), kind="nvlink", bandwidth_gbs=56.25, latency_us=8.0))
        elif rng.random() < 0.3:
            links.append(Link(between=(a.id, b.id), kind="pcie", bandwidth_gbs=rng.choice([6.5, 12.0, 25.0]),
                              latency_us=rng.choice([10.0, 15.0])))
    return RigProfile(format=FORMAT, name="random", devices=tuple(devices), links=tuple(links))


def exhaustive(ctx: Context) -> float | None:
    """Every set of disjoint units, in every order, with every split of the layers: the best decode time."""
    units = torch_units(ctx)
    L = ctx.spec.n_layers
    best = None
    for k in range(1, min(len(units), L) + 1):
        for combo in itertools.permutations(units, k):
            devs = [d for u in combo for d in u.devices]
            if len(devs) != len(set(devs)):
                continue
            for cuts in itertools.combinations(range(1, L), k - 1):
                bounds = [0, *cuts, L]
                groups = [Group(u.devices, (bounds[i], bounds[i + 1]), kv_heads=u.kv_heads) for i, u in enumerate(combo)]
                ev = evaluate_pipeline(ctx, "torch", groups)
                if ev.fits and (best is None or ev.decode.total_s < best):
                    best = ev.decode.total_s
    return best


@pytest.mark.parametrize("seed", range(int(__import__("os").environ.get("MIXRUN_OPT_SEEDS", "12"))))
def test_search_equals_exhaustive(small_spec: ModelSpec, seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(2, 5 if seed % 3 else 6)
    # memory scaled so the ~2.5 GiB model needs one to several devices
    rig = random_rig(rng, n, scale=rng.choice([0.05, 0.08, 0.12, 0.3]))
    req = PlanRequest(ctx=rng.choice([512, 2048]))
    ctx = Context(profile=rig, spec=small_spec, req=req, facts=ModelFacts(small_spec, req.kv_type))
    want = exhaustive(ctx)
    got = torch_plan(ctx)
    if want is None:
        assert got is None or not got.fits
        return
    assert got is not None and got.fits
    assert got.decode.total_s == pytest.approx(want, rel=1e-9), (got.groups, want)


# ---- the best plan the rig allows: subsets, and never worse for an added card ------------------------------------


def llamacpp_exhaustive(ctx: Context) -> float | None:
    """llama.cpp over every GPU subset: tensor over it, and every order and layer split of its GPUs (row is chosen
    only on request: current llama.cpp has none)."""
    from mixrun.planner.candidates import tensor_llamacpp

    L, best = ctx.spec.n_layers, None
    gpus = list(ctx.gpus)
    for k in range(1, len(gpus) + 1):
        for subset in itertools.combinations(gpus, k):
            times = [c.decode.total_s for c in (tensor_llamacpp(ctx, subset),) if c and c.fits]
            for order in itertools.permutations(subset):
                for cuts in itertools.combinations(range(1, L), k - 1):
                    bounds = [0, *cuts, L]
                    groups = [Group((d.id,), (bounds[i], bounds[i + 1])) for i, d in enumerate(order)]
                    ev = evaluate_pipeline(ctx, "llama.cpp", groups)
                    if ev.fits:
                        times.append(ev.decode.total_s)
            for t in times:
                best = t if best is None or t < best else best
    return best


@pytest.mark.parametrize("seed", range(8))
def test_plan_is_the_best_over_subsets_and_backends(small_spec: ModelSpec, seed: int) -> None:
    """The chosen plan is as fast as the best of an exhaustive search over device subsets, llama.cpp splits and
    torch layouts, under the same cost model, but for the split margin: more devices only for a gain past it."""
    from mixrun.planner import plan

    rng = random.Random(100 + seed)
    rig = random_rig(rng, rng.randint(2, 4), scale=rng.choice([0.05, 0.08, 0.12, 0.3]))
    req = PlanRequest(ctx=rng.choice([512, 2048]))
    ctx = Context(profile=rig, spec=small_spec, req=req, facts=ModelFacts(small_spec, req.kv_type))
    wants = [t for t in (exhaustive(ctx), llamacpp_exhaustive(ctx)) if t is not None]
    best = plan(rig, small_spec, req, suggest=False).best
    if not wants:
        assert best is None or not best.fits
        return
    assert best is not None and best.fits
    # the fastest, or a plan on fewer devices that the fastest does not beat by the split margin
    assert best.decode.total_s <= min(wants) * (1 + SPLIT_MARGIN) * (1 + 1e-9), (best.label, best.groups)


def _never_worse(profile: RigProfile, spec: ModelSpec, req: PlanRequest) -> None:
    from mixrun.planner import plan

    full = plan(profile, spec, req, suggest=False).best
    full_speed = full.decode_tok_s if full is not None and full.fits else 0.0
    for d in profile.devices:
        if d.backend == "cpu":
            continue
        sub = plan(profile.without(d.id), spec, req, suggest=False).best
        if sub is not None and sub.fits:
            assert full is not None and full.fits, f"{profile.name}: fits without {d.id}, not with it"
            assert full_speed >= sub.decode_tok_s * (1 - 1e-9), \
                f"{profile.name} without {d.id}: {sub.decode_tok_s:.2f} ({sub.label}) > {full_speed:.2f} ({full.label})"


@pytest.mark.parametrize("seed", range(10))
def test_adding_a_card_never_hurts_random_rigs(small_spec: ModelSpec, seed: int) -> None:
    rng = random.Random(200 + seed)
    rig = random_rig(rng, rng.randint(2, 5), scale=rng.choice([0.05, 0.08, 0.12, 0.3]))
    _never_worse(rig, small_spec, PlanRequest(ctx=rng.choice([512, 2048])))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory, llama70b: ModelSpec) -> dict[str, ModelSpec]:
    """Sparse files of the shapes users split: a 70B at Q4_K_M and Q5_K_M, an 8B."""
    import gguf_factory
    from mixrun.model.gguf import read_spec

    d = tmp_path_factory.mktemp("shapes")
    q5 = gguf_factory.write_model(d / "Llama-3-70B-Q5_K_M.gguf", "llama", qtype="Q5_K_M", sparse=True,
                                  **gguf_factory.LLAMA3_70B)
    b8 = gguf_factory.write_model(d / "Llama-3-8B-Q4_K_M.gguf", "llama", qtype="Q4_K_M", sparse=True, n_layers=32,
                                  n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256, tied=False)
    return {"70b-q4": llama70b, "70b-q5": read_spec(q5), "8b": read_spec(b8)}


@pytest.mark.parametrize("name", sorted(p.stem for p in __import__("pathlib").Path(__file__).parents[2]
                                        .joinpath("profiles").glob("*.toml")))
def test_adding_a_card_never_hurts_bundled_profiles(shapes: dict[str, ModelSpec], name: str) -> None:
    """Over every bundled profile and model shape: taking any GPU out never gives a faster or a fitting plan where
    the whole rig's plan is slower or does not fit."""
    from mixrun.rig.profile import load_profile

    profile = load_profile(name)
    for spec in shapes.values():
        for ctx in (4096, 8192):
            _never_worse(profile, spec, PlanRequest(ctx=ctx))
