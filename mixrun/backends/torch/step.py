"""A CPU decode step over preallocated buffers: what a CUDA graph is to a GPU step, written by hand.

An eager decode step (:func:`mixrun.backends.torch.model.attention`) makes fresh tensors and views for every
operation: about sixty small operations per layer, 5 ms of a 25 ms token for SmolLM2 on two cores, where the
products themselves take 19.5. Here every intermediate has a buffer made once, every view of a buffer (the product
columns, the Q/K complex view RoPE rotates, the new keys and values) is made once, and the products write into the
buffers (``out=``) or add into the residual in place (``baddbmm_``). A layer is then about twenty operations: the
products, two norms of four operations, one rotation, one cache write, the attention's two products and softmax,
and the SwiGLU's two in-place operations.

Used by :meth:`Transformer.forward` for one-token steps on float32 CPU parts whose weights are dense; it computes
what the eager step computes, in the same order except that the norms' sum of squares is a dot product and the
attention scale is folded into the score product.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mixrun.backends.torch.model import LayerTensors, Norm, Weight, column

if TYPE_CHECKING:
    from mixrun.backends.torch.model import Transformer


def usable(model: Transformer, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :class:`DecodeStep` can run ``model``'s layers: float32 on the CPU with dense weights and without
    biases on the row-parallel products (the eager step serves everything else)."""
    if device.type != "cpu" or dtype != torch.float32 or not len(model.layers):
        return False
    for blk in model.layers:
        t = blk.t
        if t is None or not all(isinstance(w, Weight) for w in (t.wqkv, t.wo, t.w13, t.w2)):
            return False
        if t.wo.b is not None or t.w2.b is not None:
            return False
    return True


def _batched(w: Weight) -> torch.Tensor:
    """The weight as (row blocks, rows, cols): the shape one batched product takes (see :class:`Weight`)."""
    return w.blocks if w.blocks is not None else w.w.unsqueeze(0)


@dataclass(slots=True)
class _Layer:
    attn_norm: Norm
    ffn_norm: Norm
    q_norm: Norm | None
    k_norm: Norm | None
    wqkv: torch.Tensor  # (blocks, rows, cols) views of the weights
    qkv_bias: torch.Tensor | None
    wo: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    kv_cache: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor


class DecodeStep:
    """One-token steps through ``model``'s layers (plus the all-reduces of ``reduce``, a stage's TP group, when
    set). All layers of a part have the same shapes, so one set of buffers serves them in turn.

    The result is a copy: the buffers belong to the next step."""

    def __init__(self, model: Transformer, reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        t0: LayerTensors = model.layers[0].t
        nh, nkv, hd = t0.n_head, t0.n_kv, t0.head_dim
        dim, rope = model.cfg.dim, model.rope
        self.rope, self.reduce = rope, reduce
        self.layers = [self._layer(blk.t) for blk in model.layers]
        first = self.layers[0]
        self.x = torch.zeros(1, dim)  # the residual stream
        self.x_t = self.x.t()
        self.h = torch.zeros(1, dim)  # a norm's output: the next products' input
        self.sumsq = torch.zeros(1, 1)
        self.qkv3 = torch.zeros(first.wqkv.shape[0], first.wqkv.shape[1], 1)
        qkv = self.qkv3.view(nh + 2 * nkv, hd)
        self.qkv_flat = qkv.view(-1)
        self.q_heads, self.k_heads = qkv.narrow(0, 0, nh), qkv.narrow(0, nh, nkv)
        qk = qkv.narrow(0, 0, nh + nkv)
        if rope.dim != hd:
            qk = qk.narrow(-1, 0, rope.dim)
        self.qk_complex = torch.view_as_complex(qk.unflatten(-1, (rope.dim // 2, 2)))
        self.kv_new = qkv.narrow(0, nh, 2 * nkv).view(2, nkv, hd)
        self.q = qkv.narrow(0, 0, nh).view(nkv, nh // nkv, hd)  # a KV group's query heads: one batch row
        self.scale = 1.0 / math.sqrt(hd)
        self.zero = torch.zeros(1, 1, 1)
        self.attn_out = torch.zeros(nkv, nh // nkv, hd)
        self.attn_col = column(self.attn_out.view(1, nh * hd), first.wo)
        self.qkv_col = column(self.h, first.wqkv)
        self.w13_col = column(self.h, first.w13)
        ffn = first.w13.shape[0] * first.w13.shape[1] // 2
        self.gu3 = torch.zeros(first.w13.shape[0], first.w13.shape[1], 1)
        gu = self.gu3.view(2, ffn)
        self.gate, self.up = gu[0], gu[1]
        self.gate_col = column(self.gate.view(1, ffn), first.w2)
        # the row-parallel products add into the residual in place, or into ``partial`` for the all-reduce
        self.partial = torch.zeros(1, dim)
        self.wo_out = (self.partial if reduce else self.x).view(first.wo.shape[0], first.wo.shape[1], 1)
        self.w2_out = (self.partial if reduce else self.x).view(first.w2.shape[0], first.w2.shape[1], 1)

    @staticmethod
    def _layer(t: LayerTensors) -> _Layer:
        return _Layer(attn_norm=t.attn_norm, ffn_norm=t.ffn_norm, q_norm=t.q_norm, k_norm=t.k_norm,
                      wqkv=_batched(t.wqkv), qkv_bias=t.wqkv.b, wo=_batched(t.wo), w13=_batched(t.w13),
                      w2=_batched(t.w2), kv_cache=t.kv_cache, k_cache=t.k_cache, v_cache=t.v_cache)

    def _norm(self, n: Norm) -> None:
        """``h = x * rsqrt(sum(x^2) + n eps) * (sqrt(n) w)`` (:class:`Norm`), the sum as a dot product."""
        torch.addmm(n.add, self.x, self.x_t, out=self.sumsq)
        torch.mul(self.x, self.sumsq.rsqrt_(), out=self.h)
        self.h.mul_(n.w)

    def _row_parallel(self, w: torch.Tensor, col: torch.Tensor, out: torch.Tensor) -> None:
        if self.reduce is None:
            out.baddbmm_(w, col)  # into the residual
        else:
            torch.bmm(w, col, out=out)
            self.x.add_(self.reduce(self.partial))

    def __call__(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """Hidden state ``x`` (1, dim) at position ``pos`` through the layers."""
        self.x.copy_(x)
        rot = self.rope.freqs[pos]  # (1, rope_dim / 2)
        span = pos + 1
        bmm = torch.bmm
        for t in self.layers:
            self._norm(t.attn_norm)
            bmm(t.wqkv, self.qkv_col, out=self.qkv3)
            if t.qkv_bias is not None:
                self.qkv_flat.add_(t.qkv_bias)
            if t.q_norm is not None and t.k_norm is not None:
                self.q_heads.copy_(t.q_norm(self.q_heads))
                self.k_heads.copy_(t.k_norm(self.k_heads))
            self.qk_complex.mul_(rot)
            t.kv_cache.select(2, pos).copy_(self.kv_new)
            keys = t.k_cache.narrow(1, 0, span).transpose(1, 2)
            scores = torch.baddbmm(self.zero, self.q, keys, beta=0, alpha=self.scale)  # (nkv, group, span)
            bmm(torch.softmax(scores, dim=-1), t.v_cache.narrow(1, 0, span), out=self.attn_out)
            self._row_parallel(t.wo, self.attn_col, self.wo_out)
            self._norm(t.ffn_norm)
            bmm(t.w13, self.w13_col, out=self.gu3)
            F.silu(self.gate, inplace=True).mul_(self.up)
            self._row_parallel(t.w2, self.gate_col, self.w2_out)
        return self.x.clone()
