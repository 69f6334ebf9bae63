"""The torch dequantizer against gguf-py's numpy reference, bit for bit, on whole tensors and on their slices."""

from __future__ import annotations

import gguf.quants
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from mixrun.backends.torch.quant import SUPPORTED, dequantize

Q = GGMLQuantizationType
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# byte offsets of the fp16 scale fields in a block: random bytes there would be NaN/inf or absurd scales
SCALE_OFFSETS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
                 Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
# types gguf-py can quantize to, so realistic blocks come from quantizing random floats
QUANTIZABLE = {Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0}
TYPES = sorted(SUPPORTED, key=lambda t: t.name)


def _shape(qtype: GGMLQuantizationType) -> tuple[int, int]:
    """Several rows and several blocks per row: 3 x 512 for 256-blocks, 5 x 96 otherwise."""
    return (3, 512) if GGML_QUANT_SIZES[qtype][0] == 256 else (5, 96)


def _quantized(qtype: GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    rows, cols = _shape(qtype)
    arr = rng.standard_normal((rows, cols), dtype=np.float32)
    return np.ascontiguousarray(gguf.quants.quantize(arr, qtype)).view(np.uint8)


def _random_blocks(qtype: GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    """Every code value occurs; only the fp16 scales are set to sane values."""
    rows, cols = _shape(qtype)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block_size, type_size), dtype=np.uint8)
    for off in SCALE_OFFSETS[qtype]:
        scale = rng.uniform(-2, 2, size=(rows, cols // block_size, 1)).astype(np.float16)
        raw[..., off:off + 2] = scale.view(np.uint8)
    return raw.reshape(rows, -1)


def _cases(qtype: GGMLQuantizationType) -> list[np.ndarray]:
    rng = np.random.default_rng(int(qtype))
    cases = [_quantized(qtype, rng)] if qtype in QUANTIZABLE else []
    if qtype in SCALE_OFFSETS:
        cases.append(_random_blocks(qtype, rng))
    return cases


def test_required_types_supported():
    assert {Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K} <= SUPPORTED


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matches_reference_and_slices(qtype: GGMLQuantizationType, device: str):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    for np_raw in _cases(qtype):
        rows, cols = np_raw.shape[0], np_raw.shape[1] // type_size * block_size
        want = torch.from_numpy(gguf.quants.dequantize(np_raw, qtype).astype(np.float32))
        raw = torch.from_numpy(np_raw).to(device)
        got = dequantize(raw, qtype, cols, torch.float32)
        assert got.shape == (rows, cols) and got.dtype == torch.float32 and got.device == raw.device
        # exact: max abs difference 0 (same float32 operations in the same order as the reference)
        assert torch.equal(got.cpu(), want)

        assert torch.equal(dequantize(raw[1:3], qtype, cols, torch.float32), got[1:3])
        n_blocks = cols // block_size
        start, stop = n_blocks // 3 or 1, n_blocks  # a strided, block-aligned column slice that skips block 0
        col_slice = raw[:, start * type_size:stop * type_size]
        assert torch.equal(dequantize(col_slice, qtype, (stop - start) * block_size, torch.float32),
                           got[:, start * block_size:stop * block_size])

        half = dequantize(raw, qtype, cols, torch.bfloat16)
        assert half.dtype == torch.bfloat16 and torch.equal(half, got.to(torch.bfloat16))


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q4_0, Q.Q6_K], ids=lambda t: t.name)
def test_odd_storage_offset(qtype: GGMLQuantizationType):
    """Bytes that start at an odd address cannot be viewed as fp16/fp32 in place; the result is still right."""
    np_raw = _cases(qtype)[0]
    cols = np_raw.shape[1] // GGML_QUANT_SIZES[qtype][1] * GGML_QUANT_SIZES[qtype][0]
    buf = torch.empty(np_raw.size + 1, dtype=torch.uint8)
    raw = buf[1:].view(np_raw.shape)
    raw.copy_(torch.from_numpy(np_raw))
    want = dequantize(torch.from_numpy(np_raw), qtype, cols, torch.float32)
    assert torch.equal(dequantize(raw, qtype, cols, torch.float32), want)


def test_unsupported_type_is_named():
    raw = torch.zeros(2, GGML_QUANT_SIZES[Q.IQ2_XXS][1], dtype=torch.uint8)
    with pytest.raises(ValueError, match="IQ2_XXS"):
        dequantize(raw, Q.IQ2_XXS, 256, torch.float32)


def test_wrong_byte_count_is_an_error():
    with pytest.raises(ValueError, match="Q4_0: 96 columns take 54 bytes per row, got 36"):
        dequantize(torch.zeros(2, 36, dtype=torch.uint8), Q.Q4_0, 96, torch.float32)
    with pytest.raises(ValueError, match="not whole blocks of 32"):
        dequantize(torch.zeros(2, 36, dtype=torch.uint8), Q.Q4_0, 70, torch.float32)
