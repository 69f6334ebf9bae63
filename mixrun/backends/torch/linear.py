"""How a model part's products and norms run, once its weights are loaded: the speed side of
:mod:`mixrun.backends.torch.model`, which holds the equation.

Decode speed is weight bandwidth. On the CPU a one-row product (a decode step) runs with the kernel measured fastest
on the machine (:class:`Weight`, :mod:`.cpu_matvec`); on a GPU, matrices kept in their GGUF quant blocks go through
fused kernels that read the blocks once (:class:`BlockWeight`, :mod:`.kernels`). Norms are computed in float32 as
llama.cpp computes them (:class:`Norm`). The model's modules prepare these objects in ``setup_cache`` and call them
in ``forward``; the decode steps (:mod:`.step`) call them directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mixrun.backends.torch import cpu_matvec, quant
from mixrun.backends.torch.cpu_matvec import column, cpu_chunks


class Weight:
    """A linear's weight and bias as a decode step uses them. With ``chunks`` > 1 (the ``rowblock`` kernel of
    :mod:`.cpu_matvec`, CPU only) a one-row product (a decode step) runs as one batched product over that many
    blocks of rows: where MKL computes a lone matrix-vector product on a single thread and a batch of them on all
    (a 2-core AMD EPYC: 14 -> 28 GB/s), that doubles decode speed, which is weight bandwidth. Plain ``F.linear``
    otherwise (the ``linear`` kernel: 2.5x faster than row blocks on an Intel Xeon with AVX-512/AMX)."""

    __slots__ = ("w", "b", "blocks")

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, chunks: int = 1) -> None:
        self.w, self.b = w, b
        # (chunks, rows / chunks, cols): row blocks, views of w
        self.blocks = w.view(chunks, w.shape[0] // chunks, w.shape[1]) if chunks > 1 else None

    def __call__(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ w.T + b``, plus ``add`` (a residual, folded into the product where there is no bias)."""
        blocks, b = self.blocks, self.b
        if blocks is not None and x.shape[0] == 1 and x.stride(-1) == 1:
            c, r, _k = blocks.shape
            col = column(x, blocks)  # (c, cols, 1)
            if b is None:
                # add (1, rows) -> (c, r, 1), the batched product's output
                y = torch.bmm(blocks, col) if add is None else torch.baddbmm(add.view(c, r, 1), blocks, col)
                return y.view(1, c * r)  # (c, r, 1) -> (1, rows)
            y = torch.bmm(blocks, col).view(1, c * r) + b  # (c, r, 1) -> (1, rows)
        elif b is None:
            return F.linear(x, self.w) if add is None else torch.addmm(add, x, self.w.t())  # w.t(): (cols, rows)
        else:
            y = F.linear(x, self.w, b)
        return y if add is None else y + add


class BlockWeight:
    """A linear's weight kept in its GGUF quant blocks (one part per stacked GGUF tensor, e.g. Q, K and V, each
    in its own type): the device holds the GGUF bytes the planner counted. Products of up to ``max_rows``
    activation rows (decode) go through ``matvec``, a fused kernel that reads the blocks once
    (:mod:`mixrun.backends.torch.kernels`) when there is one; longer ones (prefill, compute-bound) expand the
    matrix right before a dense product, one matrix at a time."""

    __slots__ = ("parts", "cols", "dtype", "b", "matvec", "max_rows")

    def __init__(self, parts: list[tuple[torch.Tensor, Any]], cols: int, dtype: torch.dtype,
                 b: torch.Tensor | None, matvec: Callable[..., torch.Tensor] | None = None,
                 max_rows: int = 0) -> None:
        self.parts, self.cols, self.dtype, self.b = parts, cols, dtype, b
        self.matvec, self.max_rows = matvec, max_rows

    def dense(self) -> torch.Tensor:
        mats = [quant.dequantize(raw, qtype, self.cols, self.dtype) for raw, qtype in self.parts]
        return mats[0] if len(mats) == 1 else torch.cat(mats)

    def __call__(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        if self.matvec is not None and x.shape[0] <= self.max_rows:
            ys = [self.matvec(x, raw, qtype, self.cols) for raw, qtype in self.parts]
            y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
            if self.b is not None:
                y.add_(self.b)
        else:
            y = F.linear(x, self.dense(), self.b)
        return y if add is None else y + add


Product = Weight | BlockWeight  # a linear as a step computes it: ``product(x, add=None)``


def fused_kernels(device: torch.device) -> Any:
    """:mod:`mixrun.backends.torch.kernels` where its Triton kernels can run (CUDA, with triton importable), else
    None: quantized products then expand their matrices with torch operations."""
    if device.type != "cuda":
        return None
    try:
        from mixrun.backends.torch import kernels
    except ImportError:
        return None
    return kernels


def weight(m: nn.Module, device: torch.device, split: int) -> Product:
    """How a step computes with ``m``'s weight (a linear, or the embedding table as a tied output): from GGUF
    blocks when the loader kept them, else dense, its one-row products on the CPU in row blocks over ``split``
    threads (1: ``F.linear``)."""
    bias = getattr(m, "bias", None)
    blocks = getattr(m, "blocks", None)
    if blocks:
        k = fused_kernels(device)  # it takes every quantized type the loader keeps in blocks (tested)
        if k is None:
            return BlockWeight(blocks, m.block_cols, m.block_dtype, bias)
        return BlockWeight(blocks, m.block_cols, m.block_dtype, bias, k.matvec, k.MAX_ROWS)
    w = m.weight
    return Weight(w, bias, cpu_chunks(w.shape[0], split) if device.type == "cpu" else 1)


def stacked(m: nn.Linear, n: int, device: torch.device, split: int) -> list[Product]:
    """The ``n`` matrices a linear stacks by rows (a layer's experts, from one ``*_exps`` GGUF tensor), each as
    :func:`weight` would compute it: rows of the GGUF blocks the loader kept, or views of the dense weight, so a
    product with one of them reads that matrix alone."""
    if n == 0:  # a TP member without experts
        return []
    rows = m.out_features // n
    b = m.bias  # each expert's bias (gpt-oss), stacked as the matrices are

    def bias(e: int) -> torch.Tensor | None:
        return None if b is None else b[e * rows:(e + 1) * rows]

    blocks = getattr(m, "blocks", None)
    if blocks:
        (raw, qtype), = blocks  # one GGUF tensor: (n rows, bytes per row)
        k = fused_kernels(device)
        kernel = (k.matvec, k.MAX_ROWS) if k is not None else (None, 0)
        return [BlockWeight([(raw[e * rows:(e + 1) * rows], qtype)], m.block_cols, m.block_dtype, bias(e), *kernel)
                for e in range(n)]
    chunks = cpu_chunks(rows, split) if device.type == "cpu" else 1
    return [Weight(m.weight[e * rows:(e + 1) * rows], bias(e), chunks) for e in range(n)]


def cpu_kernel(linears: Sequence[nn.Module], device: torch.device, threads: int,
               matvec: str | None) -> cpu_matvec.Choice | None:
    """The kernel of the one-row products over ``linears`` (a part's linears and output head) on ``threads``
    threads: None off the CPU; ``matvec`` (``"linear"`` or ``"rowblock"``) when given; else the one
    :func:`.cpu_matvec.choose` finds fastest over their dense weights (or ``MIXRUN_TORCH_CPU_MATVEC`` forces)."""
    if device.type != "cpu":
        return None
    if matvec is not None:
        if matvec not in cpu_matvec.KERNELS:
            raise ValueError(f"matvec: {matvec!r} is not one of {', '.join(cpu_matvec.KERNELS)}")
        return cpu_matvec.Choice(matvec, "forced")
    return cpu_matvec.choose([m.weight.detach() for m in linears if not getattr(m, "blocks", None)], threads)


def row_split(kernel: cpu_matvec.Choice | None, threads: int) -> int:
    """The threads a :class:`Weight` splits its rows over for ``kernel`` (1: one ``F.linear``)."""
    return threads if kernel is not None and kernel.kernel == cpu_matvec.ROWBLOCK else 1


class NormParams(Protocol):
    """What :class:`Norm` reads from an RMS norm module (:class:`mixrun.backends.torch.model.RMSNorm`)."""

    weight: torch.Tensor
    eps: float


class Norm:
    """``x / sqrt(mean(x^2) + eps) * w`` in float32, as llama.cpp computes it, written as
    ``x * rsqrt(sum(x^2) + n eps) * (sqrt(n) w)``: five small operations, a third of the time of ``F.rms_norm``
    on the CPU. Constants are tensors: an in-place operation with a Python number converts it first."""

    __slots__ = ("w", "add")

    def __init__(self, norm: NormParams) -> None:
        n, w = norm.weight.shape[0], norm.weight.detach()
        self.w = w.float() * math.sqrt(n)
        self.add = torch.tensor(n * norm.eps, dtype=torch.float32, device=w.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x if x.dtype == torch.float32 else x.float()
        y = (x32 * (x32 * x32).sum(-1, keepdim=True).add_(self.add).rsqrt_()).mul_(self.w)
        return y if y.dtype == x.dtype else y.to(x.dtype)
