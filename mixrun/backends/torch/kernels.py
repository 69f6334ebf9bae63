"""Fused Triton products with matrices kept in their GGUF blocks, for decode (a few activation rows).

``quant.dequantize`` expands a whole matrix before its product, which writes and reads back some 20-40 bytes per
weight; a decode step is bound by memory traffic, so that expansion costs more than the product. ``matvec`` reads
each block's bytes once, expands the weights in registers and multiplies them straight away, so the traffic is the
blocks themselves (0.5-1.1 bytes per weight) plus the activations.

One program computes ``BLOCK_N`` output rows for every activation row. It walks the columns in tiles of
``BLOCK_K`` (a multiple of every block size), viewed as ``(BLOCK_N, groups, group_size)``: a group is the run of
weights that share one scale (32 for the legacy types and Q4_K/Q5_K, 16 for Q2_K/Q3_K/Q6_K), so scale fields are
loaded once per group and broadcast, while each weight gathers its own code bytes from offsets computed from its
index. Weights are expanded in float32 with the operations of ggml's reference (``quant.py`` holds the same
layouts in torch and is the reference the tests compare with; compiled, triton may fuse a multiply and add into
one FMA, which can move a weight by its last bit); products accumulate in float32 and are cast to the activations'
dtype at the end.

Prefill (more than ``MAX_ROWS`` rows) is compute-bound: there, expanding once and calling a dense matmul is
better, as llama.cpp does, so callers fall back to ``quant.dequantize``. This module imports triton at the top;
callers import it lazily and take an ImportError to mean "no kernels".
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from mixrun.backends.torch import quant

_Q = GGMLQuantizationType
# weights per scale group (see the module docstring)
_GROUP: dict[GGMLQuantizationType, int] = {
    _Q.Q4_0: 32, _Q.Q4_1: 32, _Q.Q5_0: 32, _Q.Q5_1: 32, _Q.Q8_0: 32,
    _Q.Q2_K: 16, _Q.Q3_K: 16, _Q.Q4_K: 32, _Q.Q5_K: 32, _Q.Q6_K: 16,
}
SUPPORTED: frozenset[GGMLQuantizationType] = frozenset(_GROUP)
# above this many activation rows callers expand once and use a dense matmul (prefill is compute-bound)
MAX_ROWS = 8

# Launch shape, not tuned on a GPU (none was at hand): BLOCK_N rows per program keep 4096-row matrices at 256
# programs (about two per H100 SM); a 256-column tile is one K-quant super-block, 16 x 256 weights spread over
# 128 threads is 32 weights each. Compiled ahead of time for sm_90 (triton 3.2 and 3.9) every type and row count
# fits in 56-140 registers with no spills.
BLOCK_N = 16
BLOCK_K = 256
NUM_WARPS = 4

# the quant type ids the kernel's constexpr dispatch compares with (triton reads only constexpr globals)
_Q4_0 = tl.constexpr(int(_Q.Q4_0))
_Q4_1 = tl.constexpr(int(_Q.Q4_1))
_Q5_0 = tl.constexpr(int(_Q.Q5_0))
_Q5_1 = tl.constexpr(int(_Q.Q5_1))
_Q8_0 = tl.constexpr(int(_Q.Q8_0))
_Q2_K = tl.constexpr(int(_Q.Q2_K))
_Q3_K = tl.constexpr(int(_Q.Q3_K))
_Q4_K = tl.constexpr(int(_Q.Q4_K))
_Q5_K = tl.constexpr(int(_Q.Q5_K))
_Q6_K = tl.constexpr(int(_Q.Q6_K))


@triton.jit
def _byte(ptr, mask):
    """The byte at ``ptr`` as int32; masked-off lanes read 0, so their fp16 scales are 0 rather than NaN."""
    return tl.load(ptr, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(ptr, mask):
    """The little-endian fp16 at byte ``ptr`` as float32, from two byte loads (blocks put it at any address)."""
    bits = _byte(ptr, mask) | (_byte(ptr + 1, mask) << 8)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _nibble(ptr, j, mask):
    """Code ``j`` (0-31) of 16 bytes of 4-bit codes: low nibbles hold codes 0-15, high nibbles 16-31."""
    return (_byte(ptr + j % 16, mask) >> (j // 16 * 4)) & 0x0F


@triton.jit
def _legacy(blk, j, mask, QTYPE: tl.constexpr):
    """Q4_0/Q4_1/Q5_0/Q5_1/Q8_0: blocks of 32 led by fp16 d (and fp16 m for the _1 types); j is the index in it.

    Q5 types put the fifth bits in a little-endian uint32 before the nibbles: bit j belongs to code j."""
    d = _f16(blk, mask)
    if QTYPE == _Q4_0:
        w = (_nibble(blk + 2, j, mask) - 8).to(tl.float32) * d
    elif QTYPE == _Q4_1:  # compiled, the "+ m" sends the weight tile through a 16 KB shared-memory relayout
        w = _nibble(blk + 4, j, mask).to(tl.float32) * d + _f16(blk + 2, mask)
    elif QTYPE == _Q5_0:
        high = (_byte(blk + 2 + j // 8, mask) >> (j % 8)) & 1
        w = ((_nibble(blk + 6, j, mask) | (high << 4)) - 16).to(tl.float32) * d
    elif QTYPE == _Q5_1:
        high = (_byte(blk + 4 + j // 8, mask) >> (j % 8)) & 1
        w = (_nibble(blk + 8, j, mask) | (high << 4)).to(tl.float32) * d + _f16(blk + 2, mask)
    else:  # Q8_0: int8 codes, sign-extended from the byte
        q = _byte(blk + 2 + j, mask)
        w = (q - ((q >> 7) << 8)).to(tl.float32) * d
    return w


@triton.jit
def _k_scale_min(sc, g, mask):
    """6-bit (scale, min) of group g (0-7) from the 12 scale bytes at ``sc`` of a Q4_K/Q5_K super-block.

    Groups 0-3: low 6 bits of bytes g (scale) and g+4 (min). Groups 4-7: low 4 bits from byte g+4 (scale: low
    nibble, min: high nibble), top 2 bits from the top of bytes g-4 (scale) and g (min)."""
    a = _byte(sc + g % 4, mask)  # byte g, or g-4 for groups 4-7
    b = _byte(sc + g % 4 + 4, mask)  # byte g+4, or g for groups 4-7
    c = _byte(sc + g % 4 + 8, mask)  # byte g+4 for groups 4-7
    low = g < 4
    scale = tl.where(low, a & 0x3F, (c & 0x0F) | ((a >> 6) << 4))
    mn = tl.where(low, b & 0x3F, (c >> 4) | ((b >> 6) << 4))
    return scale, mn


@triton.jit
def _k_quant(blk, g, j, mask, QTYPE: tl.constexpr):
    """Super-blocks of 256: g is the scale group in it, j the index in the group. Layouts as in ``quant.py``."""
    if QTYPE == _Q2_K:  # 16 scale|min bytes, 64 bytes of 2-bit codes, fp16 d, fp16 dmin; 16 groups of 16
        sc = _byte(blk + g, mask)
        dl = _f16(blk + 80, mask) * (sc & 0x0F).to(tl.float32)
        ml = _f16(blk + 82, mask) * (sc >> 4).to(tl.float32)
        i = g * 16 + j  # each 32 bytes hold 128 codes: bit field f of byte l is code f * 32 + l of that half
        q = (_byte(blk + 16 + i // 128 * 32 + i % 32, mask) >> (i // 32 % 4 * 2)) & 3
        w = q.to(tl.float32) * dl - ml
    elif QTYPE == _Q3_K:  # 32 high-bit bytes, 64 bytes of 2-bit codes, 12 scale bytes, fp16 d; 16 groups of 16
        low = (_byte(blk + 96 + g % 8, mask) >> (g // 8 * 4)) & 0x0F
        high = (_byte(blk + 104 + g % 4, mask) >> (g // 4 * 2)) & 3
        dl = _f16(blk + 108, mask) * ((low | (high << 4)) - 32).to(tl.float32)
        i = g * 16 + j
        ql = (_byte(blk + 32 + i // 128 * 32 + i % 32, mask) >> (i // 32 % 4 * 2)) & 3
        hbit = (_byte(blk + i % 32, mask) >> (i // 32)) & 1
        w = (ql - ((hbit ^ 1) << 2)).to(tl.float32) * dl  # a clear high bit means -4
    elif QTYPE == _Q6_K:  # 128 low-nibble bytes, 64 bytes of 2-bit highs, 16 int8 scales, fp16 d; 16 groups of 16
        sc = _byte(blk + 192 + g, mask)
        dl = _f16(blk + 208, mask) * (sc - ((sc >> 7) << 8)).to(tl.float32)
        i = g * 16 + j
        r = i % 128  # each half of 128 codes takes 64 low-nibble bytes and 32 high-bit bytes
        ql = (_byte(blk + i // 128 * 64 + r % 64, mask) >> (r // 64 * 4)) & 0x0F
        qh = (_byte(blk + 128 + i // 128 * 32 + r % 32, mask) >> (r // 32 * 2)) & 3
        w = ((ql | (qh << 4)) - 32).to(tl.float32) * dl
    else:  # Q4_K/Q5_K: fp16 d, fp16 dmin, 12 scale bytes, [32 fifth-bit bytes,] 4-bit codes; 8 groups of 32
        scale, mn = _k_scale_min(blk + 4, g, mask)
        dl = _f16(blk, mask) * scale.to(tl.float32)
        ml = _f16(blk + 2, mask) * mn.to(tl.float32)
        if QTYPE == _Q4_K:  # each 32 code bytes hold two groups: low nibbles, then high
            q = (_byte(blk + 16 + g // 2 * 32 + j, mask) >> (g % 2 * 4)) & 0x0F
        else:  # bit g of fifth-bit byte j belongs to weight j of group g
            q = (_byte(blk + 48 + g // 2 * 32 + j, mask) >> (g % 2 * 4)) & 0x0F
            q = q | (((_byte(blk + 16 + j, mask) >> g) & 1) << 4)
        w = q.to(tl.float32) * dl - ml
    return w


@triton.jit
def _matvec_kernel(x_ptr, raw_ptr, out_ptr, M, N, stride_xm, stride_xk, stride_raw, stride_om, K: tl.constexpr,
                   QTYPE: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr, GS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[m, n] = sum_k x[m, k] * W[n, k] for BLOCK_N rows n; BS/TS: block size in weights / bytes, GS: group.

    K is a compile-time constant: one compilation per matrix width (a model has a handful), a loop of known trip
    count, and triton 3.6's interpreter fails on a runtime loop bound under numpy 2.4."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    # int64 row offsets: a large matrix's bytes can pass 2**31
    rows = raw_ptr + offs_n.to(tl.int64)[:, None, None] * stride_raw  # (BLOCK_N, 1, 1)
    nmask = (offs_n < N)[:, None, None]
    j = tl.arange(0, GS)  # index in the group
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        grp = k0 // GS + tl.arange(0, BLOCK_K // GS)  # the tile's scale groups, indexed along the row
        kmask = grp < K // GS
        gi = grp % (BS // GS)  # group index in its block
        blk = rows + (grp // (BS // GS) * TS)[None, :, None]  # (BLOCK_N, groups, 1): each group's block
        mask = nmask & kmask[None, :, None]
        if BS == 32:
            w = _legacy(blk, j[None, None, :], mask, QTYPE)
        else:
            w = _k_quant(blk, gi[None, :, None], j[None, None, :], mask, QTYPE)
        # w: (BLOCK_N, groups, GS) float32 weights of this tile
        k = grp[:, None] * GS + j[None, :]  # (groups, GS) column indices
        for m in tl.static_range(BLOCK_M):
            # padding rows (m >= M) re-read row M - 1 from cache; their sums are never stored
            xrow = x_ptr + tl.minimum(m, M - 1) * stride_xm
            xt = tl.load(xrow + k * stride_xk, mask=kmask[:, None], other=0.0)
            part = tl.sum(tl.sum(w * xt.to(tl.float32)[None, :, :], axis=2), axis=1)  # (BLOCK_N,)
            acc += tl.where(offs_m[:, None] == m, part[None, :], 0.0)
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _check(x: torch.Tensor, raw: torch.Tensor, qtype: GGMLQuantizationType, cols: int) -> None:
    """ValueErrors in ``quant.dequantize``'s words for inputs ``matvec`` cannot take."""
    quant.check_blocks(raw, qtype, cols, SUPPORTED, "no fused kernel for GGUF quant type {}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.dim() != 2 or x.shape[1] != cols:
        raise ValueError(f"activations must be a 2-D float32/float16/bfloat16 tensor with {cols} columns, "
                         f"got {x.dtype} of shape {list(x.shape)}")
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"the fused kernel takes 1 to {MAX_ROWS} activation rows, got {x.shape[0]}")
    if x.device != raw.device:
        raise ValueError(f"activations on {x.device} but weights on {raw.device}")


def matvec(x: torch.Tensor, raw: torch.Tensor, qtype: GGMLQuantizationType, cols: int) -> torch.Tensor:
    """x @ W.T for x (M, cols) with M <= MAX_ROWS and W the (N, cols) matrix whose GGUF blocks are ``raw``.

    ``raw`` is uint8 (N, cols // block_size * type_size), the layout ``quant.dequantize`` takes (a row slice of a
    bigger tensor is fine). Returns (M, N) in x's dtype, accumulated in float32 from float32 weights."""
    _check(x, raw, qtype, cols)
    if raw.stride(1) != 1:  # the kernel walks a block's bytes with unit stride
        raw = raw.contiguous()
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    m, n = x.shape[0], raw.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _matvec_kernel[(triton.cdiv(n, BLOCK_N),)](
        x, raw, out, m, n, x.stride(0), x.stride(1), raw.stride(0), out.stride(0), K=cols,
        QTYPE=int(qtype), BS=block_size, TS=type_size, GS=_GROUP[qtype],
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)
    return out
