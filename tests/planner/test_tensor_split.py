"""llama.cpp's ``-sm tensor`` placement as its source rounds it (mixrun.planner.tensor_split), and the ``-ts`` the
planner picks."""

from __future__ import annotations

import itertools

import pytest

import gguf_factory
from mixrun.model.gguf import read_spec
from mixrun.model.spec import ModelSpec
from mixrun.planner import PlanRequest, plan
from mixrun.planner.candidates import tensor_llamacpp
from mixrun.planner.evaluate import Context, evaluate_tensor
from mixrun.planner.memory import ModelFacts
from mixrun.planner.tensor_split import slices
from mixrun.rig.profile import load_profile
from mixrun.vocab import Split


def test_split_points_round_down_and_rotate() -> None:
    """Llama-3-8B at -ts 0.49,0.51: the K rows (8 heads of 128) give device 0 three heads on even layers and four on
    odd ones (the device taking the remainder rotates), so 43.75% of the KV cache rather than 49%; the FFN (14336
    rows, granule 256) gives it 6912."""
    assert slices(1024, 128, [0.49, 0.51], 0) == [384, 640]
    assert slices(1024, 128, [0.49, 0.51], 1) == [512, 512]
    assert slices(14336, 256, [0.49, 0.51], 0) == [6912, 7424]
    assert slices(128256, 1, [1, 1, 1], 2) == [42752, 42752, 42752]
    for ts in ([0.2, 0.3, 0.5], [1, 0.001, 7]):
        for rot in range(3):
            assert sum(slices(4096, 256, ts, rot)) == 4096


@pytest.fixture(scope="module")
def q5(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    path = gguf_factory.write_model(tmp_path_factory.mktemp("q5") / "Llama-3-70B-Q5_K_M.gguf", "llama",
                                    qtype="Q5_K_M", sparse=True, **gguf_factory.LLAMA3_70B)
    return read_spec(path)


def test_placement_holds_every_byte(q5: ModelSpec) -> None:
    """Split tensors are divided (their slices sum to the whole), norms are copied to every GPU."""
    ctx = Context(profile=load_profile("dual-3090-nvlink-plus-3060"), spec=q5, req=PlanRequest(ctx=8192),
                  facts=ModelFacts(q5, "f16"))
    place = ctx.tensor_model.place([0.4, 0.4, 0.2])
    split = sum(t.n_bytes for t in q5.tensors if len(t.shape) >= 2 and t.name != "token_embd.weight")
    mirrored = sum(t.n_bytes for t in q5.tensors if len(t.shape) < 2)
    assert sum(place.weights) == pytest.approx(split + 3 * mirrored, abs=3 * 4 * 80 * 8)  # integer division per slice
    kv = [sum(layer[d] for layer in place.kv_per_cell) for d in range(3)]
    assert sum(kv) == sum(ctx.facts.kv_bytes_per_cell)
    # 8 KV heads at 0.4/0.4/0.2: split points round down, so the 3060 gets 2, 1, 1 heads as the rotation turns
    assert kv[2] / sum(kv) == pytest.approx((2 + 1 + 1) / 3 / 8, abs=0.002)


def test_tensor_uses_the_odd_card_when_it_helps(q5: ModelSpec) -> None:
    """Llama-3-70B Q5_K_M at 8k on the NVLink pair plus a 3060 (issue 15, item 7): split by whole KV heads it did
    not fit and a layer split won at 14.5 tok/s; at llama.cpp's real granularity the tensor split over all three
    fits, and its -ts is as fast as the best of a fine grid of -ts vectors."""
    prof = load_profile("dual-3090-nvlink-plus-3060")
    req = PlanRequest(ctx=8192)
    best = plan(prof, q5, req).best
    assert best is not None and best.fits and best.split == Split.TENSOR
    assert best.groups[0].devices == ("gpu0", "gpu1", "gpu2") and "devices" not in best.llama_kwargs
    assert "gpu2 holds 14%: without it nothing fits" in best.why
    layer = next(c for c in plan(prof, q5, req, suggest=False).candidates if c.label.startswith("llama.cpp layer, o"))
    assert best.decode_tok_s > 1.3 * layer.decode_tok_s
    ctx = Context(profile=prof, spec=q5, req=req, facts=ModelFacts(q5, "f16"))
    gpus = list(ctx.gpus)
    grid = []
    for a, c in itertools.product(range(1, 50), range(1, 50)):
        ts = [a / 100, a / 100, c / 100]  # the matched pair takes equal shares
        ev = evaluate_tensor(ctx, gpus, ts)
        if ev.fits:
            grid.append(1 / ev.decode.total_s)
    assert grid and best.decode_tok_s >= 0.99 * max(grid)
    mine = tensor_llamacpp(ctx)
    assert mine is not None and mine.llama_kwargs["tensor_split"] == best.llama_kwargs["tensor_split"]
