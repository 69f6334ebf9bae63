"""The CPU decode step's one-row product kernel (``linear`` or ``rowblock``), chosen by measuring: both kernels give
the same logits, the chooser follows injected timings (never the host's), and its cache is used, or ignored when
it cannot be trusted. No test here times anything real."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import gguf_factory
from mixrun.backends.torch import cpu_matvec, weights
from mixrun.backends.torch.cpu_matvec import ENV, LINEAR, ROWBLOCK, Choice
from mixrun.backends.torch.model import ModelConfig, Transformer
from mixrun.backends.torch.parallel import Comm, Stage
from mixrun.backends.torch.step import decode_step
from mixrun.model.gguf import TensorFile

CPU = torch.device("cpu")


def _model(path: str | Path) -> Transformer:
    """A whole model in this process (TP=1), as a rank builds it, kernel forced (set up again per test)."""
    tf = TensorFile(str(path))
    cfg = ModelConfig.from_gguf(tf.spec, tf.fields)
    stage = Stage(("cpu",), (0, cfg.n_layers), (cfg.n_head_kv,))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV, LINEAR)  # nothing measured while building
        model, _held = weights.build_part(tf, cfg, stage, 0, Comm(None, 1), head=True, max_pos=48,
                                          dtype=torch.float32, device=CPU)
    return model


def _greedy_logits(model: Transformer, prompt: list[int], steps: int, toks: list[int] | None = None) -> torch.Tensor:
    """Logits of the prompt's last position, then of ``steps`` one-token steps (feeding ``toks`` when given, else
    the greedy tokens)."""
    out = []
    with torch.inference_mode():
        logits = model.logits(model(model.embed_tokens(torch.tensor(prompt)), 0)[-1:])
        out.append(logits)
        for i, pos in enumerate(range(len(prompt), len(prompt) + steps)):
            tok = torch.tensor([toks[i]]) if toks else torch.argmax(logits[-1]).view(1)
            logits = model.logits(model(model.embed_tokens(tok), pos))
            out.append(logits)
    return torch.cat(out)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("which", ["smollm2", "qwen2", "qwen3"])
def test_both_kernels_give_the_same_logits(which: str, smollm2: str, tmp_path: Path) -> None:
    """Each kernel forced, in the buffered step (``step.DecodeStep``) and the eager one, against plain ``F.linear``
    products in the eager step: SmolLM2 (tied head, rows divisible by 2 threads), qwen2 (QKV bias), qwen3 (QK norm,
    a head dim of 48)."""
    if which == "smollm2":
        path, prompt = smollm2, [504, 3575, 282, 4649, 314]
    else:
        path = gguf_factory.write_model(tmp_path / f"{which}.gguf", which, n_layers=2, n_embd=128, n_head=4,
                                        n_head_kv=2, head_dim=48 if which == "qwen3" else None, n_ff=256,
                                        n_vocab=64, tied=False, seed=5)
        prompt = [1, 5, 9, 3]
    model = _model(path)
    model.setup_cache(torch.float32, CPU, threads=2, matvec=LINEAR)
    model.step = None  # the reference: eager, F.linear everywhere
    ref = _greedy_logits(model, prompt, 8)
    toks = ref[:-1].argmax(-1).tolist()
    for kernel in (LINEAR, ROWBLOCK):
        for buffered in (True, False):
            model.setup_cache(torch.float32, CPU, threads=2, matvec=kernel)
            model.step = decode_step(model, torch.float32, CPU)
            assert model.matvec == Choice(kernel, "forced")
            blocks = model.layers[0].ffn.gate_up.blocks
            assert (blocks is not None and blocks.shape[0] == 2) if kernel == ROWBLOCK else blocks is None
            assert model.step is not None
            if not buffered:
                model.step = None
            got = _greedy_logits(model, prompt, 8, toks)
            assert _rel(got, ref) < 1e-5, (which, kernel, buffered)
            assert got.argmax(-1).tolist()[:-1] == toks


def test_the_variable_forces_a_kernel_and_reaches_the_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mixrun.backends.torch.engine import TorchEngine

    def must_not_time(kernel: str, run: Callable[[], None]) -> float:
        raise AssertionError("forced: nothing is measured")

    mats = [torch.zeros(8, 4)]
    assert cpu_matvec.choose(mats, 2, env={ENV: " RowBlock "}, timer=must_not_time) == Choice(ROWBLOCK, "forced")
    assert cpu_matvec.choose(mats, 2, env={ENV: "linear"}, timer=must_not_time) == Choice(LINEAR, "forced")
    path = gguf_factory.write_model(tmp_path / "tiny.gguf", "llama", n_layers=2, n_embd=64, n_head=4, n_head_kv=2,
                                    n_vocab=64, merges=True, seed=3)
    for kernel in (ROWBLOCK, LINEAR):
        monkeypatch.setenv(ENV, kernel)
        eng = TorchEngine(str(path), n_ctx=32, n_threads=2)
        try:
            assert eng.ready[0]["cpu_matvec"]["kernel"] == kernel and eng.ready[0]["cpu_matvec"]["how"] == "forced"
        finally:
            eng.close()


# ---- the chooser, with injected timings ---------------------------------------------------------------------------


def _timer(gbs: dict[str, list[float]] | dict[str, float], n_bytes: int,
           log: list[str] | None = None) -> Callable[[str, Callable[[], None]], float]:
    """A timer that runs each pass (so the products are exercised) and says it took what ``gbs`` says: one
    figure per kernel, or one per round in turn."""
    seen: dict[str, int] = {}

    def timer(kernel: str, run: Callable[[], None]) -> float:
        run()
        if log is not None:
            log.append(kernel)
        g = gbs[kernel]
        if isinstance(g, list):
            i = seen.get(kernel, 0)
            seen[kernel] = i + 1
            g = g[i % len(g)]
        return n_bytes / (g * 1e9)

    return timer


def _mats() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(n, k) for n, k in [(96, 32), (32, 32), (128, 32), (32, 64)] * 3]


def _bytes(mats: list[torch.Tensor]) -> int:
    return sum(m.numel() * m.element_size() for m in mats)


@pytest.mark.parametrize(("host", "gbs", "want"), [
    ("Intel Xeon, AVX-512/AMX VM (issue figures)", {LINEAR: 26.1, ROWBLOCK: 10.5}, LINEAR),
    ("AMD EPYC, 2 cores", {LINEAR: 14.0, ROWBLOCK: 28.0}, ROWBLOCK),
    ("a tie goes to F.linear", {LINEAR: 20.0, ROWBLOCK: 20.4}, LINEAR),
    ("noisy rounds: the median counts", {LINEAR: [14.0, 14.0, 90.0, 14.0, 2.0, 14.0, 14.0],
                                         ROWBLOCK: [28.0, 1.0, 28.0, 28.0, 28.0, 50.0, 28.0]}, ROWBLOCK),
])
def test_the_chooser_picks_what_the_timings_say(host: str, gbs: dict, want: str) -> None:
    mats = _mats()
    log: list[str] = []
    got = cpu_matvec.choose(mats, 2, env={}, timer=_timer(gbs, _bytes(mats), log), switches=lambda: 0,
                            use_cache=False)
    assert got.kernel == want, host
    assert got.how == "measured"  # outliers aside, the rounds agree
    med = {k: sorted(v)[len(v) // 2] if isinstance(v, list) else v for k, v in gbs.items()}
    assert (got.linear_gbs, got.rowblock_gbs) == pytest.approx((med[LINEAR], med[ROWBLOCK]), rel=1e-3)
    # interleaved: linear-rowblock, rowblock-linear, ...
    assert log[:4] == [LINEAR, ROWBLOCK, ROWBLOCK, LINEAR] and len(log) == 2 * cpu_matvec.ROUNDS


def test_slow_passes_stop_the_rounds_early() -> None:
    mats = _mats()
    log: list[str] = []
    slow = _bytes(mats) / 0.3e9  # GB/s at which a pass takes 0.3 s: 3 rounds exceed MAX_SECONDS
    got = cpu_matvec.choose(mats, 2, env={}, timer=_timer({LINEAR: 2 * slow, ROWBLOCK: slow}, _bytes(mats), log),
                            switches=lambda: 0, use_cache=False)
    assert got.kernel == LINEAR and len(log) == 2 * cpu_matvec.MIN_ROUNDS


def test_sample_keeps_every_shape_within_the_budget() -> None:
    mats = [torch.zeros(96, 32), torch.zeros(32, 64)] * 10 + [torch.zeros(1000, 32)]
    out = cpu_matvec.sample(mats, 2, budget_bytes=60_000)
    shapes = [tuple(m.shape) for m in out]
    assert shapes.count((96, 32)) == shapes.count((32, 64)) >= 1
    assert (1000, 32) not in shapes and any(s[0] < 1000 and s[0] % 2 == 0 and s[1] == 32 for s in shapes)
    assert all(m.is_contiguous() for m in out)
    assert cpu_matvec.sample(mats, 2, budget_bytes=1 << 30) == mats  # everything fits: nothing cut or dropped


# ---- the cache -----------------------------------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MIXRUN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_matvec, "CACHE_MIN_BYTES", 0)  # the test matrices are tiny
    return tmp_path / "cache" / cpu_matvec.CACHE_FILE


def _never(kernel: str, run: Callable[[], None]) -> float:
    raise AssertionError("the cache should have answered")


def test_a_quiet_finding_is_cached_and_used(cache: Path) -> None:
    mats = _mats()
    amd = _timer({LINEAR: 14.0, ROWBLOCK: 28.0}, _bytes(mats))
    first = cpu_matvec.choose(mats, 2, env={}, timer=amd, switches=lambda: 0)
    assert first == Choice(ROWBLOCK, "measured", 14.0, 28.0)
    entry = next(iter(json.loads(cache.read_text()).values()))
    assert entry["kernel"] == ROWBLOCK and entry["threads"] == 2 and entry["torch"] == torch.__version__
    assert cpu_matvec.choose(mats, 2, env={}, timer=_never) == Choice(ROWBLOCK, "cached", 14.0, 28.0)
    # what changes the answer changes the key: threads, shapes, OpenMP/MKL settings
    intel = _timer({LINEAR: 26.1, ROWBLOCK: 10.5}, _bytes(mats[:3]))
    assert cpu_matvec.choose(mats[:3], 2, env={}, timer=intel, switches=lambda: 0).how == "measured"
    assert cpu_matvec.choose(mats, 1, env={}, timer=intel, switches=lambda: 0).kernel == LINEAR
    assert cpu_matvec.choose(mats, 2, env={"OMP_WAIT_POLICY": "PASSIVE"}, timer=intel,
                             switches=lambda: 0).kernel == LINEAR
    assert cpu_matvec.choose(mats, 2, env={}, timer=_never).kernel == ROWBLOCK
    assert len(json.loads(cache.read_text())) == 4


def test_a_busy_or_unsteady_finding_is_used_not_cached(cache: Path) -> None:
    mats = _mats()
    count = iter(range(0, 10_000, 50))  # 50 preemptions between any two looks: the cores were taken
    busy = cpu_matvec.choose(mats, 2, env={}, timer=_timer({LINEAR: 10.0, ROWBLOCK: 0.6}, _bytes(mats)),
                             switches=lambda: next(count))
    assert busy == Choice(LINEAR, "measured on a busy machine", 10.0, 0.6) and not cache.exists()
    jumpy = _timer({LINEAR: [10.0, 30.0], ROWBLOCK: [28.0]}, _bytes(mats))
    assert cpu_matvec.choose(mats, 2, env={}, timer=jumpy, switches=lambda: 0).how == "measured on a busy machine"
    assert not cache.exists()


@pytest.mark.parametrize("content", [
    b"\x00\xffnot json",
    b"[1, 2, 3]",
    "{KEY: {\"kernel\": \"evil\", \"linear_gbs\": 1.0, \"rowblock_gbs\": 2.0}}",
    "{KEY: {\"kernel\": \"rowblock\", \"linear_gbs\": \"fast\", \"rowblock_gbs\": 2.0}}",
    "{KEY: {\"kernel\": \"rowblock\", \"linear_gbs\": NaN, \"rowblock_gbs\": 2.0}}",
    "{KEY: {\"kernel\": \"rowblock\", \"linear_gbs\": true, \"rowblock_gbs\": 2.0}}",
    "{KEY: {\"kernel\": \"rowblock\", \"linear_gbs\": -1, \"rowblock_gbs\": 2.0}}",
    "{KEY: [\"rowblock\"]}",
    "huge",
])
def test_a_corrupt_cache_is_ignored(cache: Path, content: bytes | str) -> None:
    mats = _mats()
    key = cpu_matvec.cache_key(mats, 2, {})
    cache.parent.mkdir(parents=True)
    if content == "huge":  # a well-formed entry in a file past the size bound: not even parsed
        entry = {"kernel": ROWBLOCK, "linear_gbs": 1.0, "rowblock_gbs": 2.0, "pad": "x" * (2 << 20)}
        cache.write_text(json.dumps({key: entry}))
    else:
        cache.write_bytes(content.replace("KEY", json.dumps(key)).encode() if isinstance(content, str) else content)
    intel = _timer({LINEAR: 26.1, ROWBLOCK: 10.5}, _bytes(mats))
    got = cpu_matvec.choose(mats, 2, env={}, timer=intel, switches=lambda: 0)
    assert got == Choice(LINEAR, "measured", 26.1, 10.5)
    assert cpu_matvec.choose(mats, 2, env={}, timer=_never) == Choice(LINEAR, "cached", 26.1, 10.5)


def test_cpu_info_reads_the_first_processor() -> None:
    text = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
            "flags\t\t: fpu avx512f amx_tile sse\n\nprocessor\t: 1\nmodel name\t: something else\n")
    assert cpu_matvec.cpu_info(text) == ("Intel(R) Xeon(R) Platinum 8480+", {"amx_tile", "avx512f", "fpu", "sse"})
    assert cpu_matvec.cpu_info("")[0]  # no /proc/cpuinfo: what platform says
