"""One-token decode steps, faster than the model's ``forward``; the builder (:func:`.weights.build_part`) installs
one as ``Transformer.step`` with :func:`decode_step`.

:class:`FoldedStep` runs the modules' own computation with each residual add folded into the output product
(``x + wo(o)`` as one ``addmm``) where no all-reduce comes between: an operation fewer per product, which a
launch-bound GPU step, and the CUDA graph that captures it (:mod:`.graphs`), feel.

:class:`DecodeStep` is a CPU decode step over preallocated buffers: what a CUDA graph is to a GPU step, written by
hand. An eager decode step (:meth:`mixrun.backends.torch.model.Attention.forward`) makes fresh tensors and views for
every operation: about sixty small operations per layer, 5 ms of a 25 ms token for SmolLM2 on two cores, where the
products themselves take 19.5. Here every intermediate has a buffer made once, every view of a buffer (the product
columns, the Q/K complex view RoPE rotates, the new keys and values) is made once, and the products write into the
buffers (``out=``) or add into the residual in place (``baddbmm_``). A layer is then about twenty operations: the
products, two norms of four operations, one rotation, one cache write, the attention's two products and softmax,
and the SwiGLU's two in-place operations.

It serves float32 CPU parts whose weights are dense, and computes what the eager step computes, in the same order
except that the norms' sum of squares is a dot product and the attention scale is folded into the score product.
The products use the part's kernel (:mod:`.cpu_matvec`): ``torch.mm`` of the row and the transposed weight
(``F.linear``'s product), or ``torch.bmm`` of the row blocks and the row as a strided column.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mixrun.backends.torch.cpu_matvec import ROWBLOCK, column
from mixrun.backends.torch.linear import Norm, Weight
from mixrun.backends.torch.moe import MoEFeedForward

if TYPE_CHECKING:
    from mixrun.backends.torch.model import Block, Rope, Transformer

Reduce = Callable[[torch.Tensor], torch.Tensor]  # the all-reduce over a stage's TP group, in place


def decode_step(model: Transformer, dtype: torch.dtype, device: torch.device,
                reduce: Reduce | None = None) -> DecodeStep | FoldedStep:
    """The one-token step for ``model`` (after its ``setup_cache``): the buffered :class:`DecodeStep` where it can
    run, else :class:`FoldedStep`. ``reduce`` is the all-reduce of a part with tensor parallelism: the steps call
    the layers' computations directly, past the hooks that all-reduce a module's output."""
    return DecodeStep(model, reduce) if usable(model, dtype, device) else FoldedStep(model, reduce)


class FoldedStep:
    """One-token steps through ``model``'s layers, each as :meth:`Block.forward` computes it, with the residual
    adds folded into the ``wo`` and ``w2`` products; with ``reduce`` (tensor parallelism) the add follows the
    all-reduce instead. The position may be an int or a one-element tensor (a fixed-shape step, as a CUDA graph
    captures it). The modules' ``forward`` are called as plain methods: a module call costs about 1 us."""

    def __init__(self, model: Transformer, reduce: Reduce | None) -> None:
        self.rope: Rope = model.rope
        self.reduce = reduce
        self.layers = [self._layer(blk) for blk in model.layers]

    @staticmethod
    def _layer(blk: Block) -> tuple[Norm, Callable[..., torch.Tensor], Norm, Callable[..., torch.Tensor]]:
        attn_norm, ffn_norm = blk.attn_norm.compute, blk.ffn_norm.compute
        assert attn_norm is not None and ffn_norm is not None, "setup_cache() first"
        return attn_norm, blk.attn.forward, ffn_norm, blk.ffn.forward

    def __call__(self, x: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
        """Hidden states ``x`` (1, dim) at position ``pos`` through the layers."""
        rope, reduce = self.rope, self.reduce
        for attn_norm, attn, ffn_norm, ffn in self.layers:
            if reduce is None:
                x = attn(attn_norm(x), pos, rope, x)  # x + attention, the add inside the wo product
                x = ffn(ffn_norm(x), x)
            else:
                x = x + reduce(attn(attn_norm(x), pos, rope))
                x = x + reduce(ffn(ffn_norm(x)))
        return x


def usable(model: Transformer, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :class:`DecodeStep` can run ``model``'s layers: float32 on the CPU with dense weights, without
    biases on the row-parallel products and without routed experts (the eager step serves everything else)."""
    if device.type != "cpu" or dtype != torch.float32 or not len(model.layers):
        return False
    for blk in model.layers:
        a, f = blk.attn, blk.ffn
        if isinstance(f, MoEFeedForward):  # routed experts: FoldedStep calls their own forward
            return False
        if not all(isinstance(w, Weight) for w in (a.qkv, a.out, f.gate_up, f.down)):
            return False
        if a.out.b is not None or f.down.b is not None:
            return False
    return True


def _operand(w: Weight, rowblock: bool) -> torch.Tensor:
    """The weight as its kernel takes it: (row blocks, rows, cols) for one batched product (see :class:`Weight`),
    or (cols, rows), the transposed view ``F.linear`` multiplies by."""
    if not rowblock:
        return w.w.t()
    return w.blocks if w.blocks is not None else w.w.unsqueeze(0)


@dataclass(slots=True)
class _Layer:
    attn_norm: Norm
    ffn_norm: Norm
    q_norm: Norm | None
    k_norm: Norm | None
    wqkv: torch.Tensor  # views of the weights, as the kernel takes them (see _operand)
    qkv_bias: torch.Tensor | None
    wo: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    kv_cache: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor


class DecodeStep:
    """One-token steps through ``model``'s layers (plus the all-reduces of ``reduce``, a stage's TP group, when
    set), with the one-row product kernel of ``model.matvec``. All layers of a part have the same shapes, so one
    set of buffers serves them in turn.

    The result is a copy: the buffers belong to the next step."""

    def __init__(self, model: Transformer, reduce: Reduce | None) -> None:
        a0 = model.layers[0].attn
        nh, nkv, hd = a0.n_head, a0.n_kv, a0.head_dim
        dim, rope = model.cfg.dim, model.rope
        self.rope, self.reduce = rope, reduce
        self.rowblock = rowblock = model.matvec is not None and model.matvec.kernel == ROWBLOCK
        self.layers = [self._layer(blk, rowblock) for blk in model.layers]
        first = self.layers[0]
        self.x = torch.zeros(1, dim)  # the residual stream
        self.x_t = self.x.t()
        self.h = torch.zeros(1, dim)  # a norm's output: the next products' input
        self.sumsq = torch.zeros(1, 1)
        qkv = torch.zeros(nh + 2 * nkv, hd)
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
        ffn = model.layers[0].ffn.w13.weight.shape[0] // 2
        gu = torch.zeros(2, ffn)
        self.gate, self.up = gu[0], gu[1]
        # each product's input and output as its kernel takes them: a row (1, n) for torch.mm; for torch.bmm the
        # input as a column over the row blocks, the output as (row blocks, rows, 1). The row-parallel products
        # add into the residual in place, or write into ``partial`` for the all-reduce.
        self.partial = torch.zeros(1, dim)
        acc = self.partial if reduce else self.x
        ins = {"wqkv": self.h, "wo": self.attn_out.view(1, nh * hd), "w13": self.h, "w2": self.gate.view(1, ffn)}
        outs = {"wqkv": qkv.view(1, -1), "wo": acc, "w13": gu.view(1, -1), "w2": acc}
        if rowblock:
            ins = {k: column(v, getattr(first, k)) for k, v in ins.items()}
            outs = {k: v.view(getattr(first, k).shape[0], -1, 1) for k, v in outs.items()}
        self.qkv_in, self.attn_in, self.w13_in, self.gate_in = ins["wqkv"], ins["wo"], ins["w13"], ins["w2"]
        self.qkv_out, self.wo_out, self.gu_out, self.w2_out = outs["wqkv"], outs["wo"], outs["w13"], outs["w2"]

    @staticmethod
    def _layer(blk: Block, rowblock: bool) -> _Layer:
        a, f = blk.attn, blk.ffn
        assert isinstance(a.qkv, Weight) and isinstance(a.out, Weight), "dense weights only (see usable)"
        assert isinstance(f.gate_up, Weight) and isinstance(f.down, Weight), "dense weights only (see usable)"
        assert blk.attn_norm.compute is not None and blk.ffn_norm.compute is not None, "setup_cache() first"
        q_norm, k_norm = a.qk_norms if a.qk_norms is not None else (None, None)
        return _Layer(attn_norm=blk.attn_norm.compute, ffn_norm=blk.ffn_norm.compute, q_norm=q_norm, k_norm=k_norm,
                      wqkv=_operand(a.qkv, rowblock), qkv_bias=a.qkv.b, wo=_operand(a.out, rowblock),
                      w13=_operand(f.gate_up, rowblock), w2=_operand(f.down, rowblock), kv_cache=a.kv_cache,
                      k_cache=a.k_cache, v_cache=a.v_cache)

    def _product(self, w: torch.Tensor, inp: torch.Tensor, out: torch.Tensor) -> None:
        if self.rowblock:
            torch.bmm(w, inp, out=out)
        else:
            torch.mm(inp, w, out=out)

    def _norm(self, n: Norm) -> None:
        """``h = x * rsqrt(sum(x^2) + n eps) * (sqrt(n) w)`` (:class:`Norm`), the sum as a dot product."""
        torch.addmm(n.add, self.x, self.x_t, out=self.sumsq)
        torch.mul(self.x, self.sumsq.rsqrt_(), out=self.h)
        self.h.mul_(n.w)

    def _row_parallel(self, w: torch.Tensor, inp: torch.Tensor, out: torch.Tensor) -> None:
        if self.reduce is not None:
            self._product(w, inp, out)
            self.x.add_(self.reduce(self.partial))
        elif self.rowblock:
            out.baddbmm_(w, inp)  # into the residual
        else:
            out.addmm_(inp, w)

    def __call__(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """Hidden state ``x`` (1, dim) at position ``pos`` through the layers."""
        self.x.copy_(x)
        rot = self.rope.freqs[pos]  # (1, rope_dim / 2)
        span = pos + 1
        product = self._product
        for t in self.layers:
            self._norm(t.attn_norm)
            product(t.wqkv, self.qkv_in, self.qkv_out)
            if t.qkv_bias is not None:
                self.qkv_flat.add_(t.qkv_bias)
            if t.q_norm is not None and t.k_norm is not None:
                self.q_heads.copy_(t.q_norm(self.q_heads))
                self.k_heads.copy_(t.k_norm(self.k_heads))
            self.qk_complex.mul_(rot)
            t.kv_cache.select(2, pos).copy_(self.kv_new)
            keys = t.k_cache.narrow(1, 0, span).transpose(1, 2)
            scores = torch.baddbmm(self.zero, self.q, keys, beta=0, alpha=self.scale)  # (nkv, group, span)
            torch.bmm(torch.softmax(scores, dim=-1), t.v_cache.narrow(1, 0, span), out=self.attn_out)
            self._row_parallel(t.wo, self.attn_in, self.wo_out)
            self._norm(t.ffn_norm)
            product(t.w13, self.w13_in, self.gu_out)
            F.silu(self.gate, inplace=True).mul_(self.up)
            self._row_parallel(t.w2, self.gate_in, self.w2_out)
        return self.x.clone()
