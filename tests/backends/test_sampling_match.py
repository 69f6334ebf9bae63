"""The torch backend's sampler against llama.cpp's own sampler chain: the same logits, settings and seed must pick the
same tokens, and the two backends must write the same text with the chat defaults.

The oracle is the chain llama-cpp-python builds (``Llama._init_sampler``: penalties, top-k, typical, top-p, min-p,
temperature, dist, or greedy at temperature 0), driven the way ``llama_sampler_sample`` drives it: a
``llama_token_data_array`` of the whole vocabulary in id order, ``llama_sampler_apply``, the ``selected`` entry, then
``llama_sampler_accept``.
"""

from __future__ import annotations

import ctypes
import platform
import types
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest

import gguf_factory
from mixrun.backends.base import Sampling, Stats
from mixrun.backends.llamacpp import LlamaCppEngine
from mixrun.backends.torch.engine import TorchEngine
from mixrun.backends.torch.sampling import LLAMA_DEFAULT_SEED, Sampler, expf, resolve_seed

TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data


def _chain(s: dict[str, Any], n_vocab: int) -> Any:
    """llama-cpp-python's own chain for these settings (what Llama.generate builds for each call)."""
    llm = types.SimpleNamespace(_n_vocab=n_vocab, last_n_tokens_size=64, _seed=s["seed"])
    return llama_cpp.Llama._init_sampler(llm, top_k=s["top_k"], top_p=s["top_p"], min_p=s["min_p"],
                                         temp=s["temperature"], repeat_penalty=s["repeat_penalty"])


def _llama_pick(chain: Any, logits: np.ndarray) -> int:
    buf = np.zeros(logits.size, TOKEN_DATA)
    buf["id"] = np.arange(logits.size)
    buf["logit"] = logits
    cur = llama_cpp.llama_token_data_array(data=buf.ctypes.data_as(llama_cpp.llama_token_data_p), size=logits.size,
                                           selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(chain.sampler, ctypes.byref(cur))
    token = int(cur.data[cur.selected].id)
    llama_cpp.llama_sampler_accept(chain.sampler, token)
    return token


def _logits(gen: np.random.Generator, n_vocab: int, ties: str) -> np.ndarray:
    x = gen.standard_normal(n_vocab) * 3.0
    if ties == "some":  # steps of 0.5: equal logits everywhere, the top ones included
        x = np.round(x * 2.0) / 2.0
    elif ties == "many":  # a handful of values
        x = np.round(x / 3.0) * 2.0
    elif ties == "flat":  # all equal: the pick reads the draw directly
        x = np.zeros(n_vocab)
    return x.astype(np.float32)


def _match(s: dict[str, Any], n_vocab: int, ties: str, steps: int, history: list[int], seed: int) -> None:
    gen = np.random.default_rng(seed)
    chain, ours = _chain(s, n_vocab), Sampler(s)
    assert ours.seed == s["seed"] & 0xFFFFFFFF
    for t in history:
        llama_cpp.llama_sampler_accept(chain.sampler, t)
        ours.accept(t)
    for step in range(steps):
        x = _logits(gen, n_vocab, ties)
        if history and step % 2:
            x[history[-5:]] += 4.0  # recent tokens near the top, where the penalty moves them
        want = _llama_pick(chain, x)
        assert ours.sample(x) == want, f"step {step}"


DEFAULTS = {"temperature": 0.7, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.1}
SETTINGS = {
    "chat-defaults": DEFAULTS,
    "greedy-penalized": {**DEFAULTS, "temperature": 0.0},
    "greedy": {**DEFAULTS, "temperature": 0.0, "repeat_penalty": 1.0},
    "negative-temp": {**DEFAULTS, "temperature": -1.0},  # penalties then dist on everything
    "tiny-temp": {**DEFAULTS, "temperature": 1e-46},  # 0.0f in C: llama_sampler_temp_impl's argmax branch
    "plain": {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0},
    "top-p-unsorted": {"temperature": 1.3, "top_k": 0, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.1},
    "top-p-small": {"temperature": 0.9, "top_k": 0, "top_p": 0.3, "min_p": 0.0, "repeat_penalty": 1.0},
    "min-p-only": {"temperature": 0.5, "top_k": 0, "top_p": 1.0, "min_p": 0.1, "repeat_penalty": 1.0},
    "min-p-one": {"temperature": 0.8, "top_k": 0, "top_p": 1.0, "min_p": 1.0, "repeat_penalty": 1.0},
    "top-k-big": {"temperature": 0.8, "top_k": 300, "top_p": 0.99, "min_p": 0.01, "repeat_penalty": 1.3},
    "top-k-128": {"temperature": 0.9, "top_k": 128, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 0.9},
    "top-k-1": {**DEFAULTS, "top_k": 1},
}


@pytest.mark.parametrize("n_vocab", [49152, 700, 100])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_sampler_matches_llamacpp_chain(name: str, n_vocab: int) -> None:
    """Many draws on random logits, with and without equal logits, from an empty and from a full penalty window."""
    for i, (ties, seed) in enumerate([("none", 1), ("none", 0), ("some", 42), ("many", 2**32 + 5), ("flat", -2)]):
        s = {**SETTINGS[name], "seed": seed}
        history = [] if i % 2 else [int(t) for t in np.random.default_rng(i).integers(0, n_vocab, 70)]
        _match(s, n_vocab, ties, 24, history, seed=1000 * i + n_vocab)


def test_window_is_the_last_64_accepted_tokens() -> None:
    """A token accepted 65 tokens ago is out of the window: unpenalized, it wins the greedy pick again."""
    s = {**DEFAULTS, "temperature": 0.0, "repeat_penalty": 10.0, "seed": 1}
    x = np.zeros(500, np.float32)
    x[7], x[8] = 2.0, 1.0
    for gap, want in ((63, 8), (64, 7)):
        chain, ours = _chain(s, x.size), Sampler(s)
        for t in [7] + list(range(100, 100 + gap)):
            llama_cpp.llama_sampler_accept(chain.sampler, t)
            ours.accept(t)
        assert _llama_pick(chain, x) == want
        assert ours.sample(x) == want


def test_seeds_follow_llamacpp() -> None:
    """uint32 seeds, LLAMA_DEFAULT_SEED (or None) meaning a random one."""
    assert resolve_seed(5) == 5 and resolve_seed(2**32 + 5) == 5 and resolve_seed(-2) == 2**32 - 2
    assert len({resolve_seed(None) for _ in range(8)}) > 1
    assert len({resolve_seed(LLAMA_DEFAULT_SEED) for _ in range(8)}) > 1
    assert len({resolve_seed(-1) for _ in range(8)}) > 1
    a, b = Sampler({"seed": 9}), Sampler({"seed": 9})
    assert [a.uniform() for _ in range(4)] == [b.uniform() for _ in range(4)]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the oracle is the C library's own expf, which llama.cpp calls; only glibc's is ported")
def test_expf_is_glibcs() -> None:
    """Bit for bit, where llama.cpp's softmax and dist use it (x <= 0): numpy's float32 exp differs in ~40% of
    these, a float64 exp rounded to float32 in ~0.06%."""
    libm = ctypes.CDLL(None)
    libm.expf.restype, libm.expf.argtypes = ctypes.c_float, [ctypes.c_float]
    gen = np.random.default_rng(0)
    x = np.concatenate([gen.uniform(-110, 0, 100_000), gen.uniform(-1, 0, 100_000),
                        [0.0, -0.0, -np.inf, -1e-30, -63.09946, -87.5, -103.9, -104.0]]).astype(np.float32)
    want = np.array([libm.expf(float(v)) for v in x], dtype=np.float32)
    np.testing.assert_array_equal(expf(x), want)


# ---- end to end -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_f32(smollm2: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gguf_factory.dequantized_copy(smollm2, tmp_path_factory.mktemp("f32") / "SmolLM2-135M-F32.gguf")


def test_backends_write_the_same_text_with_chat_defaults(smollm2_f32: Path) -> None:
    """Sampling() defaults (temperature 0.7, top-k 40, top-p 0.95, min-p 0.05, repeat penalty 1.1), seeds 0-2, 32
    tokens. llama.cpp gets an F32 KV cache so both backends compute the same logits (to ~1e-5); with its default F16
    cache, 2 of seeds 0-9 part ways within 32 tokens: its logits differ more, and a draw falls on the other side of
    a boundary (fed llama.cpp's own logits, the sampler still picks its tokens, all 10 seeds)."""
    prompt = "The history of computing began"
    f32_kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    ref = LlamaCppEngine(str(smollm2_f32), n_ctx=256, n_threads=4, kwargs=f32_kv)
    ours = TorchEngine(str(smollm2_f32), n_ctx=256)
    try:
        for seed in (0, 1, 2):
            sampling = Sampling(seed=seed, max_tokens=32)
            want = "".join(ref.generate(prompt, sampling, Stats()))
            got = "".join(ours.generate(prompt, sampling, Stats()))
            assert got == want, f"seed {seed}"
        # the penalty window starts empty at each answer: greedy with the default penalty agrees too
        greedy = Sampling(temperature=0.0, max_tokens=32)
        assert "".join(ours.generate(prompt, greedy, Stats())) == "".join(ref.generate(prompt, greedy, Stats()))
    finally:
        ref.close()
        ours.close()
