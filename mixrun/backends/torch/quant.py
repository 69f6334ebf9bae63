"""GGUF quant blocks -> float tensors with torch ops only, so quantized weights can stay on any device (CPU or CUDA)
in their GGUF blocks and be expanded one matrix at a time right before its matmul.

Bit layouts follow ggml (``gguf.quants`` is the reference this is tested against, bit for bit). Every type is
dequantized in float32 with the same operations in the same order as the reference, so the float32 result is exact;
the cast to the run dtype comes last. Work is vectorized over all blocks of all rows at once: the raw bytes are
viewed as (rows, n_blocks, type_size) without a copy, and only the small fp16 scale fields are copied (to make
their bytes aligned for reinterpretation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_Q = GGMLQuantizationType
# types stored as plain floats: reinterpreting the bytes is all there is to do
_PLAIN: dict[GGMLQuantizationType, torch.dtype] = {
    _Q.F32: torch.float32, _Q.F16: torch.float16, _Q.BF16: torch.bfloat16,
}


def _split_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., n) uint8 -> (..., 8 // bits, n): entry [i, k] is bit field i (bits ``i*bits`` upward) of byte k.

    This is the order in which ggml packs its low-bit codes: a run of bytes holds consecutive elements in its
    lowest field, the next elements in its next field, and so on."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=x.device).unsqueeze(-1)
    return (x.unsqueeze(-2) >> shifts) & ((1 << bits) - 1)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 field at byte ``start`` of every block, as float32 (rows, n_blocks, 1).

    The field is cloned first: a view to float16 needs contiguous bytes at an even storage offset, which a strided
    slice of the blocks is not; the copy is 2 bytes per block."""
    field = blocks[..., start:start + 2].clone(memory_format=torch.contiguous_format)
    return field.view(torch.float16).float()


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    """Block of 32: fp16 d, then 16 bytes of 4-bit codes (low nibbles: elements 0-15); x = d * (q - 8)."""
    q = _split_bits(b[..., 2:], 4).flatten(-2)  # (rows, nb, 32)
    return (q.to(torch.int8) - 8).float().mul_(_f16(b, 0))


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    """Block of 32: fp16 d, fp16 m, then 16 bytes of 4-bit codes; x = d * q + m."""
    q = _split_bits(b[..., 4:], 4).flatten(-2)  # (rows, nb, 32)
    return q.float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _five_bit(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """5-bit codes of a 32-block: ``qh`` (rows, nb, 4) is a little-endian uint32 of fifth bits, ``qs`` 4-bit codes."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    high = ((qh.unsqueeze(-1) >> shifts) & 1).flatten(-2)  # (rows, nb, 32): bit j of the uint32 is element j
    return _split_bits(qs, 4).flatten(-2) | (high << 4)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    """Block of 32: fp16 d, 4 bytes of fifth bits, 16 bytes of 4-bit codes; x = d * (q - 16)."""
    q = _five_bit(b[..., 2:6], b[..., 6:])
    return (q.to(torch.int8) - 16).float().mul_(_f16(b, 0))


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    """Block of 32: fp16 d, fp16 m, 4 bytes of fifth bits, 16 bytes of 4-bit codes; x = d * q + m."""
    q = _five_bit(b[..., 4:8], b[..., 8:])
    return q.float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    """Block of 32: fp16 d, 32 int8 codes; x = d * q."""
    return b[..., 2:].view(torch.int8).float().mul_(_f16(b, 0))


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    """Super-block of 256 in 16 groups of 16: 16 bytes of 4-bit scale | 4-bit min, 64 bytes of 2-bit codes, fp16 d,
    fp16 dmin; x = d * scale * q - dmin * min."""
    rows, nb = b.shape[:2]
    sc = b[..., :16]
    dl = (_f16(b, 80) * (sc & 0x0F).float()).unsqueeze(-1)  # (rows, nb, 16, 1)
    ml = (_f16(b, 82) * (sc >> 4).float()).unsqueeze(-1)
    q = _split_bits(b[..., 16:80].unflatten(-1, (2, 32)), 2)  # (rows, nb, 2 halves, 4 fields, 32)
    return q.reshape(rows, nb, 16, 16).float().mul_(dl).sub_(ml)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    """Super-block of 256 in 16 groups of 16: 32 bytes of high-bit mask, 64 bytes of 2-bit codes, 12 bytes of
    6-bit signed scales, fp16 d; x = d * (scale - 32) * (q - 4 * (1 - hbit))."""
    rows, nb = b.shape[:2]
    sc = b[..., 96:108]
    # scales: low 4 bits are the nibbles of bytes 0-7 (all low nibbles first), high 2 bits the fields of bytes 8-11
    low = _split_bits(sc[..., :8], 4).flatten(-2)  # (rows, nb, 16)
    high = _split_bits(sc[..., 8:], 2).flatten(-2)  # (rows, nb, 16)
    scale = (low | (high << 4)).to(torch.int8) - 32
    dl = (_f16(b, 108) * scale.float()).unsqueeze(-1)  # (rows, nb, 16, 1)
    ql = _split_bits(b[..., 32:96].unflatten(-1, (2, 32)), 2).reshape(rows, nb, 16, 16)
    hbit = _split_bits(b[..., :32], 1).reshape(rows, nb, 16, 16)
    # ggml stores the high bit inverted: a set bit means no -4 offset
    q = ql.to(torch.int8) - ((hbit ^ 1) << 2).to(torch.int8)
    return q.float().mul_(dl)


def _k_scales(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 scale bytes of a Q4_K/Q5_K super-block -> 6-bit (scales, mins), each (rows, nb, 8).

    Groups 0-3 keep their 6 bits in the low bits of bytes 0-3 (scales) and 4-7 (mins); groups 4-7 take their low 4
    bits from bytes 8-11 (scale: low nibble, min: high nibble) and their top 2 bits from the top of bytes 0-7."""
    d, m, md = sc.unflatten(-1, (3, 4)).unbind(-2)  # (rows, nb, 4) each
    scales = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mins = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return scales, mins


def _k_affine(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x = d * scale * q - dmin * min for the 8 groups of 32 codes ``q`` (rows, nb, 8, 32) of Q4_K/Q5_K blocks."""
    scales, mins = _k_scales(b[..., 4:16])
    dl = (_f16(b, 0) * scales.float()).unsqueeze(-1)  # (rows, nb, 8, 1)
    ml = (_f16(b, 2) * mins.float()).unsqueeze(-1)
    return q.float().mul_(dl).sub_(ml)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    """Super-block of 256 in 8 groups of 32: fp16 d, fp16 dmin, 12 scale bytes, 128 bytes of 4-bit codes (each 32
    bytes hold two groups: low nibbles, then high)."""
    rows, nb = b.shape[:2]
    q = _split_bits(b[..., 16:].unflatten(-1, (4, 32)), 4)  # (rows, nb, 4, 2, 32)
    return _k_affine(b, q.reshape(rows, nb, 8, 32))


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    """Q4_K plus 32 bytes of fifth bits after the scales: bit j of byte l belongs to element l of group j."""
    rows, nb = b.shape[:2]
    ql = _split_bits(b[..., 48:].unflatten(-1, (4, 32)), 4).reshape(rows, nb, 8, 32)
    qh = _split_bits(b[..., 16:48], 1)  # (rows, nb, 8, 32)
    return _k_affine(b, ql | (qh << 4))


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    """Super-block of 256 in 16 groups of 16: 128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 int8 scales,
    fp16 d; x = d * scale * (q - 32). Each half of 128 elements takes 64 low-bit bytes and 32 high-bit bytes."""
    rows, nb = b.shape[:2]
    ql = _split_bits(b[..., :128].unflatten(-1, (2, 64)), 4).reshape(rows, nb, 256)  # (half, nibble, 64)
    qh = _split_bits(b[..., 128:192].unflatten(-1, (2, 32)), 2).reshape(rows, nb, 256)  # (half, field, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(rows, nb, 16, 16)
    dl = (_f16(b, 208) * b[..., 192:208].view(torch.int8).float()).unsqueeze(-1)  # (rows, nb, 16, 1)
    return q.float().mul_(dl)


_BLOCKS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    _Q.Q4_0: _q4_0, _Q.Q4_1: _q4_1, _Q.Q5_0: _q5_0, _Q.Q5_1: _q5_1, _Q.Q8_0: _q8_0,
    _Q.Q2_K: _q2_k, _Q.Q3_K: _q3_k, _Q.Q4_K: _q4_k, _Q.Q5_K: _q5_k, _Q.Q6_K: _q6_k,
}

SUPPORTED: frozenset[GGMLQuantizationType] = frozenset(_PLAIN) | frozenset(_BLOCKS)


def _reinterpret(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bytes of ``raw`` (rows, n_bytes) as ``dtype``; a view when the slice is aligned for it, else one copy."""
    try:
        return raw.view(dtype)
    except RuntimeError:  # storage offset or row stride not a multiple of the element size
        return raw.clone(memory_format=torch.contiguous_format).view(dtype)


def check_blocks(raw: torch.Tensor, qtype: GGMLQuantizationType, cols: int,
                 supported: frozenset[GGMLQuantizationType], refusal: str) -> tuple[int, int]:
    """(block size, type size) of ``qtype`` once ``raw`` is known to hold whole blocks of ``cols`` columns per row
    (see :func:`dequantize`); else a ValueError naming the problem, ``refusal`` (formatted with the type's name)
    for a type outside ``supported``."""
    if qtype not in supported:
        name = getattr(qtype, "name", qtype)
        listed = ", ".join(sorted(t.name for t in supported))
        raise ValueError(f"{refusal.format(name)} (supported: {listed})")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if raw.dtype != torch.uint8 or raw.dim() != 2:
        raise ValueError(f"{qtype.name} data must be a 2-D uint8 tensor, got {raw.dtype} of shape {list(raw.shape)}")
    if cols % block_size:
        raise ValueError(f"{qtype.name}: {cols} columns are not whole blocks of {block_size}")
    if raw.shape[1] != cols // block_size * type_size:
        raise ValueError(f"{qtype.name}: {cols} columns take {cols // block_size * type_size} bytes per row, "
                         f"got {raw.shape[1]}")
    return block_size, type_size


def dequantize(raw: torch.Tensor, qtype: GGMLQuantizationType, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """raw: uint8 tensor (rows, cols // block_size * type_size) holding whole GGUF blocks row by row (the layout of a
    GGUF tensor's data, a row slice of it, or a block-aligned column slice of it); returns (rows, cols) in dtype.

    Runs on ``raw``'s device. For F32 data asked for as float32 the result is a view of ``raw`` (no copy)."""
    block_size, type_size = check_blocks(raw, qtype, cols, SUPPORTED,
                                         "cannot dequantize GGUF quant type {} with torch")
    if qtype in _PLAIN:
        return _reinterpret(raw, _PLAIN[qtype]).to(dtype)
    blocks = raw.unflatten(-1, (cols // block_size, type_size))  # (rows, nb, type_size), a view
    return _BLOCKS[qtype](blocks).reshape(raw.shape[0], cols).to(dtype)
