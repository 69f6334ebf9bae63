"""The fused Triton kernels against ``quant.dequantize`` + matmul, run by Triton's interpreter on the CPU.

``quant.dequantize`` is itself tested bit for bit against gguf-py, so agreeing with it to float32 summation error
means the kernels read every layout right. Shapes are small: the interpreter runs each program in numpy.
"""

from __future__ import annotations

import os
import sys

# Triton reads this when @triton.jit decorates (its own library functions too), so it must be set before triton or
# the kernels module is first imported; with it the kernels run on CPU tensors, no GPU needed. It holds for the
# whole pytest process: a test of the compiled kernels on a GPU has to run in a process of its own.
if "triton" in sys.modules:
    raise RuntimeError("triton was imported before test_torch_kernels could switch it to its interpreter")
os.environ["TRITON_INTERPRET"] = "1"

import gguf.quants  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402

import gguf_factory  # noqa: E402
from mixrun.backends.torch import kernels, quant  # noqa: E402

Q = GGMLQuantizationType
TYPES = sorted(kernels.SUPPORTED, key=lambda t: t.name)
# types gguf-py can quantize to, so realistic blocks come from quantizing random floats
QUANTIZABLE = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0}
ROWS = 37  # not a multiple of BLOCK_N: the last program has masked-off rows


def _cols(qtype: GGMLQuantizationType) -> int:
    """Three super-blocks for K-quants; nine 32-blocks for the rest, so the second column tile is mostly masked."""
    return 768 if GGML_QUANT_SIZES[qtype][0] == 256 else 288


def _random_blocks(qtype: GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator) -> torch.Tensor:
    return torch.from_numpy(gguf_factory.random_blocks(qtype, rows, cols, rng))


def _quantized(qtype: GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator) -> torch.Tensor:
    """Realistic blocks: random floats quantized by gguf-py (which can write the legacy types only)."""
    arr = rng.standard_normal((rows, cols), dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(arr, qtype)).view(np.uint8))


def _assert_product(got: torch.Tensor, x: torch.Tensor, raw: torch.Tensor, qtype: GGMLQuantizationType,
                    cols: int, rtol: float = 1e-4) -> None:
    """got == x @ W.T up to rounding: the bound is relative to sum |x| |W|, what float32 summation order can move."""
    w = quant.dequantize(raw, qtype, cols, torch.float32)
    want = x.float() @ w.T
    bound = rtol * (x.float().abs() @ w.abs().T) + 1e-6
    assert got.shape == want.shape and got.dtype == x.dtype
    err = (got.float() - want).abs()
    assert bool((err <= bound).all()), f"max error {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"


def test_supported_is_every_quantized_type_quant_expands():
    assert {t for t in quant.SUPPORTED if GGML_QUANT_SIZES[t][0] > 1} == kernels.SUPPORTED


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matches_dequantize_then_matmul(qtype: GGMLQuantizationType):
    rng = np.random.default_rng(int(qtype))
    cols = _cols(qtype)
    cases = [_random_blocks(qtype, ROWS, cols, rng)]
    if qtype in QUANTIZABLE:
        cases.append(_quantized(qtype, ROWS, cols, rng))
    for raw in cases:
        for m in (1, 3):
            x = torch.from_numpy(rng.standard_normal((m, cols), dtype=np.float32))
            _assert_product(kernels.matvec(x, raw, qtype, cols), x, raw, qtype, cols)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_activations(dtype: torch.dtype):
    """Half-precision x gives a result in x's dtype, accumulated in float32 (only the final cast rounds)."""
    rng = np.random.default_rng(1)
    raw = _random_blocks(Q.Q4_K, ROWS, 512, rng)
    x = torch.from_numpy(rng.standard_normal((kernels.MAX_ROWS, 512), dtype=np.float32)).to(dtype)
    _assert_product(kernels.matvec(x, raw, Q.Q4_K, 512), x, raw, Q.Q4_K, 512, rtol=2 ** -7)


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q6_K], ids=lambda t: t.name)
def test_slices_give_what_their_copies_give(qtype: GGMLQuantizationType):
    """Rows and block-aligned columns cut from bigger tensors (TP shards): offsets and strides reach the kernel."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    cols = 3 * 256
    big = _random_blocks(qtype, 60, cols, np.random.default_rng(2))
    x_big = torch.randn(4, 2 * cols)
    x = x_big[1:3, ::2]  # strided activations too
    rows = big[7:44]  # a storage offset
    assert torch.equal(kernels.matvec(x, rows, qtype, cols), kernels.matvec(x.contiguous(), rows.clone(), qtype, cols))
    start, stop = 256 // block_size, 3 * 256 // block_size  # drop the first 256 columns: row stride != row bytes
    sliced = big[7:44, start * type_size:stop * type_size]
    assert sliced.stride(0) != sliced.shape[1]
    got = kernels.matvec(x[:, 256:], sliced, qtype, 512)
    assert torch.equal(got, kernels.matvec(x[:, 256:].contiguous(), sliced.contiguous(), qtype, 512))
    _assert_product(got, x[:, 256:], sliced, qtype, 512)


def test_bad_inputs_are_value_errors():
    raw = torch.zeros(4, 54, dtype=torch.uint8)  # 4 rows of three Q4_0 blocks: 96 columns
    with pytest.raises(ValueError, match=f"1 to {kernels.MAX_ROWS} activation rows, got {kernels.MAX_ROWS + 1}"):
        kernels.matvec(torch.zeros(kernels.MAX_ROWS + 1, 96), raw, Q.Q4_0, 96)
    with pytest.raises(ValueError, match="Q4_0: 128 columns take 72 bytes per row, got 54"):
        kernels.matvec(torch.zeros(1, 128), raw, Q.Q4_0, 128)
    with pytest.raises(ValueError, match="with 96 columns, got torch.float32 of shape \\[1, 64\\]"):
        kernels.matvec(torch.zeros(1, 64), raw, Q.Q4_0, 96)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        kernels.matvec(torch.zeros(1, 96, dtype=torch.float64), raw, Q.Q4_0, 96)
    with pytest.raises(ValueError, match="no fused kernel for GGUF quant type IQ2_XXS"):
        kernels.matvec(torch.zeros(1, 256), torch.zeros(4, 66, dtype=torch.uint8), Q.IQ2_XXS, 256)
    with pytest.raises(ValueError, match="no fused kernel for GGUF quant type F16"):
        kernels.matvec(torch.zeros(1, 96), torch.zeros(4, 192, dtype=torch.uint8), Q.F16, 96)


def _part(path, blocks: bool):
    """A whole model in this process (TP=1, float32 on the CPU), built as a rank builds its part."""
    from mixrun.backends.torch import weights
    from mixrun.backends.torch.model import ModelConfig
    from mixrun.backends.torch.parallel import Comm, Stage
    from mixrun.model.gguf import TensorFile

    tf = TensorFile(str(path))
    cfg = ModelConfig.from_gguf(tf.spec, tf.fields)
    stage = Stage(("cpu",), (0, cfg.n_layers), (cfg.n_head_kv,))
    part, _held = weights.build_part(tf, cfg, stage, 0, Comm(None, 1), head=True, max_pos=32, blocks=blocks,
                                     dtype=torch.float32, device=torch.device("cpu"))
    return part


def test_a_model_in_blocks_decodes_through_the_kernels(tmp_path, monkeypatch):
    """A Q4_K_M model kept in its blocks, with the kernels switched on as on a GPU: the prompt (more than MAX_ROWS
    tokens) expands its matrices, the decode steps go through ``matvec`` for every matrix of both types and the
    tied output, and the logits are the dense float32 model's (the K-quant blocks are random bytes: gguf-py cannot
    write K-quants)."""
    from mixrun.backends.torch import linear

    path = gguf_factory.write_model(tmp_path / "q4km.gguf", "llama", n_layers=2, n_embd=256, n_head=4, n_head_kv=2,
                                    n_ff=512, n_vocab=64, qtype="Q4_K_M", seed=11)
    seen: list[tuple[GGMLQuantizationType, int]] = []

    def counting(x, raw, qtype, cols):
        seen.append((qtype, raw.shape[0]))
        return kernels.matvec(x, raw, qtype, cols)

    fake = type("Kernels", (), {"SUPPORTED": kernels.SUPPORTED, "MAX_ROWS": kernels.MAX_ROWS, "matvec": counting})
    monkeypatch.setattr(linear, "fused_kernels", lambda device: fake)
    fused = _part(path, blocks=True)
    dense = _part(path, blocks=False)
    prompt = torch.arange(1, kernels.MAX_ROWS + 3)
    with torch.inference_mode():
        a = fused.logits(fused(fused.embed_tokens(prompt), 0)[-1:])
        b = dense.logits(dense(dense.embed_tokens(prompt), 0)[-1:])
        assert seen == [(Q.Q4_K, 64)]  # the prompt's matrices are expanded; its last row's logits are one row
        seen.clear()
        for pos in range(len(prompt), len(prompt) + 4):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item()), pos
            tok = torch.argmax(b[-1]).view(1)
            a = fused.logits(fused(fused.embed_tokens(tok), pos))
            b = dense.logits(dense(dense.embed_tokens(tok), pos))
    # per step and layer: Q, K and V (V in Q6_K), wo, gate and up, w2 (one call per GGUF tensor); then the head
    assert len(seen) == 4 * (2 * 7 + 1)
    assert {q for q, _ in seen} == {Q.Q4_K, Q.Q6_K}
