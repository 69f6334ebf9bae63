"""A Llama-family decoder in plain PyTorch, with no distributed code in it.

One sequence at a time (the chat case): activations are ``(T, dim)``. Architectures: llama (Mistral, SmolLM2 with
tied embeddings), qwen2 (QKV bias), qwen3 (QK norm, explicit head dim). A model object may hold only a slice of the
network: layers ``[start, end)``, with or without the embedding and the output head, so a pipeline stage builds just
its own part. Tensor parallelism is applied afterwards by :mod:`mixrun.backends.torch.parallel`, which shrinks the
linears to their shards; the head counts below are therefore read from the modules, never from the config.

RoPE layout: llama GGUFs store Q and K permuted for llama.cpp's "normal" rotation of adjacent pairs
``(x[2i], x[2i+1])``; qwen2/qwen3 GGUFs keep the NEOX layout, which rotates ``(x[i], x[i + d/2])``. The loader
reorders NEOX models' Q and K rows into pair order (:func:`pair_order`), so one rotation serves both.

Decode speed on the CPU is weight bandwidth: Q/K/V and gate/up are fused linears (fewer, longer products), and
one-row products run with the kernel measured fastest on the machine (:class:`Weight`, :mod:`.cpu_matvec`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mixrun.backends.torch import cpu_matvec, quant
from mixrun.backends.torch.cpu_matvec import column, cpu_chunks


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layers: int
    dim: int
    n_head: int
    n_head_kv: int
    head_dim: int
    ffn_dim: int
    vocab: int
    norm_eps: float
    rope_base: float
    rope_dim: int
    rope_neox: bool  # half-split rotation (qwen) rather than adjacent pairs (llama)
    qkv_bias: bool
    qk_norm: bool
    tied: bool

    @classmethod
    def from_gguf(cls, spec: Any, fields: dict[str, Any]) -> ModelConfig:
        arch = spec.arch
        eps = fields.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
        return cls(arch=arch, n_layers=spec.n_layers, dim=spec.n_embd, n_head=spec.n_head, n_head_kv=spec.n_head_kv,
                   head_dim=spec.head_dim, ffn_dim=spec.n_ff, vocab=spec.n_vocab, norm_eps=float(eps),
                   rope_base=spec.rope.freq_base, rope_dim=spec.rope.dim or spec.head_dim,
                   rope_neox=arch in ("qwen2", "qwen3"), qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3",
                   tied=spec.tied_output)


class Weight:
    """A linear's weight and bias as a decode step uses them. With ``chunks`` > 1 (the ``rowblock`` kernel of
    :mod:`.cpu_matvec`, CPU only) a one-row product (a decode step) runs as one batched product over that many
    blocks of rows: where MKL computes a lone matrix-vector product on a single thread and a batch of them on all
    (a 2-core AMD EPYC: 14 -> 28 GB/s), that doubles decode speed, which is weight bandwidth. Plain ``F.linear``
    otherwise (the ``linear`` kernel: 2.5x faster than row blocks on an Intel Xeon with AVX-512/AMX)."""

    __slots__ = ("w", "b", "blocks")

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, chunks: int = 1) -> None:
        self.w, self.b = w, b
        self.blocks = w.view(chunks, w.shape[0] // chunks, w.shape[1]) if chunks > 1 else None

    def __call__(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ w.T + b``, plus ``add`` (a residual, folded into the product where there is no bias)."""
        blocks, b = self.blocks, self.b
        if blocks is not None and x.shape[0] == 1 and x.stride(-1) == 1:
            c, r, _k = blocks.shape
            col = column(x, blocks)
            if b is None:
                y = torch.bmm(blocks, col) if add is None else torch.baddbmm(add.view(c, r, 1), blocks, col)
                return y.view(1, c * r)
            y = torch.bmm(blocks, col).view(1, c * r) + b
        elif b is None:
            return F.linear(x, self.w) if add is None else torch.addmm(add, x, self.w.t())
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


class RMSNorm(nn.Module):
    """An RMS norm's weight (computed by :class:`Norm`)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


class Norm:
    """``x / sqrt(mean(x^2) + eps) * w`` in float32, as llama.cpp computes it, written as
    ``x * rsqrt(sum(x^2) + n eps) * (sqrt(n) w)``: five small operations, a third of the time of ``F.rms_norm``
    on the CPU. Constants are tensors: an in-place operation with a Python number converts it first."""

    __slots__ = ("w", "add")

    def __init__(self, norm: RMSNorm) -> None:
        n, w = norm.weight.shape[0], norm.weight.detach()
        self.w = w.float() * math.sqrt(n)
        self.add = torch.tensor(n * norm.eps, dtype=torch.float32, device=w.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x if x.dtype == torch.float32 else x.float()
        y = (x32 * (x32 * x32).sum(-1, keepdim=True).add_(self.add).rsqrt_()).mul_(self.w)
        return y if y.dtype == x.dtype else y.to(x.dtype)


def pair_order(cfg: ModelConfig) -> list[int] | None:
    """The order of a head's features that turns the half-split (NEOX) rotation into the adjacent-pair one:
    feature ``2i`` takes ``i`` and ``2i + 1`` takes ``i + rope_dim/2``. The loader applies it to the Q and K rows
    (and QK-norm weights) of NEOX models, so one rotation serves every architecture; attention scores are sums
    over features and do not change. None for llama GGUFs, which are stored in pair order already."""
    if not cfg.rope_neox:
        return None
    half = cfg.rope_dim // 2
    return [j for i in range(half) for j in (i, i + half)] + list(range(cfg.rope_dim, cfg.head_dim))


class Rope:
    """Rotation of adjacent feature pairs ``(x[2i], x[2i+1])`` by ``pos * base^(-2i/rope_dim)``, as a complex
    product, over the first ``rope_dim`` features (see :func:`pair_order` for NEOX models)."""

    def __init__(self, cfg: ModelConfig, max_pos: int) -> None:
        self.dim, self.base, self.max_pos = cfg.rope_dim, cfg.rope_base, max_pos
        self.freqs = torch.empty(0)
        self.positions = torch.empty(0)

    def build(self, device: torch.device) -> None:
        """The table ``exp(i * angle)``, (max_pos, 1, dim/2), computed in float64 on the CPU."""
        inv = self.base ** (-torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim)  # (dim/2,)
        ang = torch.arange(self.max_pos, dtype=torch.float64)[:, None, None] * inv  # (max_pos, 1, dim/2)
        self.freqs = torch.polar(torch.ones_like(ang), ang).to(torch.complex64).to(device)
        self.positions = torch.arange(self.max_pos, device=device)  # masks a fixed-shape decode step

    def rotate_(self, x: torch.Tensor, pos: int | torch.Tensor) -> None:
        """Rotate ``x`` in place: (T, heads, head_dim) at positions ``[pos, pos + T)``, or (heads, head_dim) at
        ``pos`` (an int, or a one-element tensor for a fixed-shape step). Float32 is rotated as complex numbers
        where it lies; other dtypes through a float32 copy."""
        rot = x if self.dim == x.shape[-1] else x.narrow(-1, 0, self.dim)
        if isinstance(pos, torch.Tensor):
            f = self.freqs.index_select(0, pos).view(1, self.dim // 2)
        else:
            f = self.freqs.select(0, pos) if x.dim() == 2 else self.freqs.narrow(0, pos, x.shape[0])
        if rot.dtype == torch.float32:
            torch.view_as_complex(rot.unflatten(-1, (self.dim // 2, 2))).mul_(f)
        else:
            c = torch.view_as_complex(rot.float().unflatten(-1, (self.dim // 2, 2))) * f
            rot.copy_(torch.view_as_real(c).flatten(-2))


class Attention(nn.Module):
    """GQA attention's parameters: Q, K and V as one fused linear. ``n_head`` and ``n_kv`` are this part's heads
    (tensor parallelism shrinks them with the linears)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hd = cfg.head_dim
        self.head_dim, self.n_head, self.n_kv = hd, cfg.n_head, cfg.n_head_kv
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.n_head_kv) * hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_head * hd, cfg.dim, bias=False)
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None


class FeedForward(nn.Module):
    """SwiGLU's parameters: gate and up as one fused linear ``w13``, down as ``w2``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)  # gate rows, then up rows
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down


@dataclass(slots=True)
class LayerTensors:
    """One layer's tensors and sizes, fetched once by :meth:`Transformer.setup_cache`: a decode step is a few
    hundred small operations, and looking parameters up through ``nn.Module`` costs about 1 us each."""

    n_head: int
    n_kv: int
    head_dim: int
    attn_norm: Norm
    wqkv: Weight | BlockWeight
    q_norm: Norm | None
    k_norm: Norm | None
    wo: Weight | BlockWeight
    ffn_norm: Norm
    w13: Weight | BlockWeight
    w2: Weight | BlockWeight
    kv_cache: torch.Tensor  # (2, n_kv, max_pos, head_dim): keys, then values, written by one copy per step
    k_cache: torch.Tensor  # views of kv_cache
    v_cache: torch.Tensor
    scale: torch.Tensor  # 1/sqrt(head_dim), a tensor (see Norm)


def weight(m: nn.Module, device: torch.device, split: int) -> Weight | BlockWeight:
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


class Block(nn.Module):
    """One decoder layer. Tensor parallelism sets ``reduce``, the all-reduce over the stage's group that follows
    the row-parallel ``wo`` and ``w2``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)
        self.reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.t: LayerTensors | None = None

    def setup_cache(self, max_pos: int, dtype: torch.dtype, device: torch.device, split: int) -> None:
        a, f = self.attn, self.ffn
        kv = torch.zeros(2, a.n_kv, max_pos, a.head_dim, dtype=dtype, device=device)
        self.t = LayerTensors(
            n_head=a.n_head, n_kv=a.n_kv, head_dim=a.head_dim,
            attn_norm=Norm(self.attn_norm), wqkv=weight(a.wqkv, device, split),
            q_norm=Norm(a.q_norm) if a.q_norm is not None else None,
            k_norm=Norm(a.k_norm) if a.k_norm is not None else None,
            wo=weight(a.wo, device, split), ffn_norm=Norm(self.ffn_norm), w13=weight(f.w13, device, split),
            w2=weight(f.w2, device, split), kv_cache=kv, k_cache=kv[0], v_cache=kv[1],
            scale=torch.tensor(1.0 / math.sqrt(a.head_dim), dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, pos: int | torch.Tensor, rope: Rope) -> torch.Tensor:
        t = self.t
        assert t is not None, "setup_cache() first"
        if self.reduce is None:  # the residual adds fold into the wo and w2 products
            x = attention(t.attn_norm(x), pos, t, rope, x)
            return feed_forward(t.ffn_norm(x), t, x)
        x = x + self.reduce(attention(t.attn_norm(x), pos, t, rope))
        return x + self.reduce(feed_forward(t.ffn_norm(x), t))


def attention(x: torch.Tensor, pos: int | torch.Tensor, t: LayerTensors, rope: Rope,
              add: torch.Tensor | None = None) -> torch.Tensor:
    """GQA attention of positions ``[pos, pos + T)`` over the KV cache (plus ``add``, the residual, when given),
    before the all-reduce. ``narrow`` and ``select`` rather than indexing, RoPE in place and one copy into the
    cache, and a decode step (T = 1) without its T axis: such a step is a few hundred small operations, and each
    view or index costs about a microsecond.

    A one-element tensor ``pos`` makes a decode step of fixed shapes: it attends over the whole cache with the
    positions after ``pos`` masked, so a CUDA graph captures it once and replays it for every token."""
    T, hd, nh, nkv = x.shape[0], t.head_dim, t.n_head, t.n_kv
    fixed = isinstance(pos, torch.Tensor)
    group, heads = nh // nkv, nh + 2 * nkv
    qkv = t.wqkv(x).view(heads, hd) if T == 1 else t.wqkv(x).view(T, heads, hd)  # a fresh tensor: ours to change
    d = qkv.dim() - 2  # the heads axis
    if t.q_norm is not None and t.k_norm is not None:
        qkv.narrow(d, 0, nh).copy_(t.q_norm(qkv.narrow(d, 0, nh)))
        qkv.narrow(d, nh, nkv).copy_(t.k_norm(qkv.narrow(d, nh, nkv)))
    rope.rotate_(qkv.narrow(d, 0, nh + nkv), pos)
    if fixed:
        t.kv_cache.index_copy_(2, pos, qkv.narrow(0, nh, 2 * nkv).view(2, nkv, 1, hd))
        q, keys, vals = qkv.narrow(0, 0, nh).view(nkv, group, hd), t.k_cache, t.v_cache
    elif T == 1:
        t.kv_cache.select(2, pos).copy_(qkv.narrow(0, nh, 2 * nkv).view(2, nkv, hd))
        q = qkv.narrow(0, 0, nh).view(nkv, group, hd)
        keys, vals = t.k_cache.narrow(1, 0, pos + 1), t.v_cache.narrow(1, 0, pos + 1)
    else:
        t.kv_cache.narrow(2, pos, T).copy_(qkv.narrow(1, nh, 2 * nkv).view(T, 2, nkv, hd).permute(1, 2, 0, 3))
        # GQA without copying the cache: a KV group's query heads (and positions) are one batch row of queries
        q = qkv.narrow(1, 0, nh).view(T, nkv, group, hd).permute(1, 2, 0, 3).reshape(nkv, group * T, hd)
        keys, vals = t.k_cache.narrow(1, 0, pos + T), t.v_cache.narrow(1, 0, pos + T)
    scores = torch.bmm(q, keys.transpose(1, 2)).mul_(t.scale)  # (nkv, group*T, S)
    if fixed:
        scores.masked_fill_(rope.positions > pos, float("-inf"))
    elif T > 1:  # query i sits at position pos + i and sees keys up to it
        S = pos + T
        mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=pos)  # (T, S)
        scores = scores.view(nkv, group, T, S).masked_fill(~mask, float("-inf")).view(nkv, group * T, S)
    if scores.dtype == torch.float32:
        probs = torch.softmax(scores, dim=-1)
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.bmm(probs, vals)  # (nkv, group*T, hd)
    out = out.view(1, nh * hd) if T == 1 else out.view(nkv, group, T, hd).permute(2, 0, 1, 3).reshape(T, nh * hd)
    return t.wo(out, add)


def feed_forward(x: torch.Tensor, t: LayerTensors, add: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU ``w2(silu(gate x) * up x)`` (plus ``add``, the residual, when given), before the all-reduce."""
    gate, up = t.w13(x).chunk(2, dim=-1)
    return t.w2(F.silu(gate).mul_(up), add)


class Embedding(nn.Module):
    """Token embedding over vocabulary rows ``[start, start + rows)``; ids outside give zeros (a vocab-parallel
    shard sums to the full lookup across its group)."""

    def __init__(self, rows: int, dim: int, start: int = 0, shard: bool = False) -> None:
        super().__init__()
        self.start, self.shard, self.rows = start, shard, rows
        self.weight = nn.Parameter(torch.empty(rows, dim))
        self.blocks: list[tuple[torch.Tensor, Any]] = []  # the table in GGUF blocks, when the loader kept them

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.blocks:
            return F.embedding(ids, self.weight)
        raw, qtype = self.blocks[0]
        return quant.dequantize(raw.index_select(0, ids), qtype, self.block_cols, self.block_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.shard:
            return self.lookup(ids)
        local = ids - self.start
        inside = (local >= 0) & (local < self.rows)
        out = self.lookup(local.clamp(0, self.rows - 1))  # (T, dim)
        return out * inside[:, None].to(out.dtype)


class Transformer(nn.Module):
    """Layers ``[start, end)`` of the model, plus the embedding and the output head when ``head`` is set (the
    stage that samples also embeds the next token, so both live together)."""

    def __init__(self, cfg: ModelConfig, layers: tuple[int, int], head: bool, max_pos: int) -> None:
        super().__init__()
        self.cfg, self.max_pos = cfg, max_pos
        self.layers = nn.ModuleList(Block(cfg) for _ in range(layers[1] - layers[0]))
        self.rope = Rope(cfg, max_pos)
        self.embed = Embedding(cfg.vocab, cfg.dim) if head else None
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps) if head else None
        # a tied output is the embedding table itself (one copy; the planner counts one)
        self.output = nn.Linear(cfg.dim, cfg.vocab, bias=False) if head and not cfg.tied else None
        self._output: Weight | BlockWeight | None = None
        self._norm: Norm | None = None
        # one-token steps, when faster: chosen by the builder (weights.build_part), not by the model
        self.step: Callable[[torch.Tensor, int], torch.Tensor] | None = None
        self.matvec: cpu_matvec.Choice | None = None  # the CPU's one-row product kernel (None off the CPU)

    def setup_cache(self, dtype: torch.dtype, device: torch.device, threads: int | None = None,
                    matvec: str | None = None) -> None:
        """KV caches and RoPE table on ``device``, once the weights are loaded; on the CPU, the kernel of the
        one-row products over ``threads``: ``matvec`` (``"linear"`` or ``"rowblock"``) or else the one
        :func:`.cpu_matvec.choose` finds fastest here (or ``MIXRUN_TORCH_CPU_MATVEC`` forces)."""
        threads = threads or torch.get_num_threads()
        self.rope.build(device)
        head = self.output if self.output is not None else self.embed  # a tied output is the embedding table
        linears = [m for blk in self.layers for m in (blk.attn.wqkv, blk.attn.wo, blk.ffn.w13, blk.ffn.w2)]
        linears += [head] if head is not None else []
        if device.type != "cpu":
            self.matvec = None
        elif matvec is not None:
            if matvec not in cpu_matvec.KERNELS:
                raise ValueError(f"matvec: {matvec!r} is not one of {', '.join(cpu_matvec.KERNELS)}")
            self.matvec = cpu_matvec.Choice(matvec, "forced")
        else:
            self.matvec = cpu_matvec.choose([m.weight.detach() for m in linears if not getattr(m, "blocks", None)],
                                            threads)
        split = threads if self.matvec is not None and self.matvec.kernel == cpu_matvec.ROWBLOCK else 1
        for blk in self.layers:
            blk.setup_cache(self.max_pos, dtype, device, split)
        if head is not None:
            self._output = weight(head, device, split)
        if self.norm is not None:
            self._norm = Norm(self.norm)
        self.step = None  # the builder installs a faster one-token step where one fits (step.decode_step)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        assert self.embed is not None
        return self.embed(ids)

    def forward(self, x: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
        """Run this part's layers on hidden states ``x`` of positions ``[pos, pos + T)`` (a one-element tensor
        ``pos``: one decode step of fixed shapes, see :func:`attention`)."""
        if self.step is not None and x.shape[0] == 1 and isinstance(pos, int):
            return self.step(x, pos)
        rope = self.rope
        for blk in self.layers:
            x = blk(x, pos, rope)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        assert self.norm is not None
        assert self._output is not None and self._norm is not None, "setup_cache() first"
        return self._output(self._norm(x)).float()  # (T, vocab or its shard)
