"""A Llama-family decoder in plain PyTorch, with no distributed code in it.

One sequence at a time (the chat case): activations are ``(T, dim)``. Architectures: llama (Mistral, SmolLM2 with
tied embeddings), qwen2 (QKV bias), qwen3 (QK norm, explicit head dim), qwen3moe (qwen3 with routed experts for its
FFN, :mod:`.moe`), glm4moe (QKV bias, partial NEOX rotation, leading dense layers, sigmoid routing with a selection
bias and a shared expert; its trailing NextN/MTP layers are not run, as llama.cpp's main graph does not), gpt-oss
(sliding-window layers, attention sinks, biases, YaRN). A model object may hold only a slice of the network: layers
``[start, end)``, with or without the embedding and the output head, so a pipeline stage builds just its own part. Tensor parallelism is applied
afterwards by :mod:`mixrun.backends.torch.parallel`, which shrinks the linears to their shards; the head counts
below are therefore read from the modules, never from the config.

RoPE layout: llama GGUFs store Q and K permuted for llama.cpp's "normal" rotation of adjacent pairs
``(x[2i], x[2i+1])``; qwen2/qwen3 GGUFs keep the NEOX layout, which rotates ``(x[i], x[i + d/2])``. The loader
reorders NEOX models' Q and K rows into pair order (:func:`pair_order`), so one rotation serves both.

Decode speed is weight bandwidth: Q/K/V and gate/up are fused linears (fewer, longer products). Once the weights
are loaded, ``setup_cache`` prepares how each product and norm runs (:mod:`.linear`: the CPU kernel measured
fastest, GGUF blocks through fused GPU kernels, float32 norms), and ``forward`` calls those. The one-token steps
that fold the residual adds into the products or run over preallocated buffers live in :mod:`.step`; the builder
(:func:`.weights.build_part`) installs one as :attr:`Transformer.step`.
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
from mixrun.backends.torch.ffn import FeedForward
from mixrun.backends.torch.linear import Norm, Product, cpu_kernel, row_split, weight
from mixrun.backends.torch.moe import MoEFeedForward


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
    # mixture of experts (qwen3moe, glm4moe): a layer's FFN is routed experts when n_expert > 0 (:mod:`.moe`),
    # after the first n_dense_lead layers
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0  # one expert's FFN width
    n_dense_lead: int = 0
    n_ff_shared: int = 0  # the shared expert's FFN width (0: none)
    gating: str = "softmax"  # the router's probabilities: "softmax" over the experts, or "sigmoid" of each
    probs_bias: bool = False  # a per-expert bias added to the probabilities to choose the experts, not to weigh them
    norm_w: bool = True  # the chosen experts' weights divided by their sum
    w_scale: float = 1.0  # and then multiplied by this
    n_nextn: int = 0  # trailing NextN/MTP layers: counted in n_layers (the plan's ranges), never run
    # gpt-oss: sliding-window attention, attention sinks, biases on wo, the router and the experts, the SwiGLU-OAI
    # activation, and the chosen experts weighed by a softmax of their logits
    window: int = 0  # the sliding window of the layers that have one (0: none)
    sliding: tuple[bool, ...] = ()  # per layer: whether it has the window (the spec's KV layers say)
    sinks: bool = False
    o_bias: bool = False
    moe_bias: bool = False  # biases on the router and on every expert's gate, up and down
    activation: str = "silu"  # the experts' activation: "silu" (SwiGLU) or "oai" (gpt-oss's clamped SwiGLU)
    # RoPE scaling as llama.cpp applies it (llama-context.cpp): freq_scale = 1/factor; YaRN's ramp between
    # interpolated and extrapolated angles over the dims [corr_lo, corr_hi], and its magnitude factor
    rope_freq_scale: float = 1.0
    yarn_ext_factor: float = 0.0
    yarn_attn_factor: float = 1.0
    yarn_orig_ctx: int = 0

    @classmethod
    def from_gguf(cls, spec: Any, fields: dict[str, Any]) -> ModelConfig:
        arch = spec.arch
        eps = fields.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
        n_used = spec.n_expert_used if spec.n_expert else 0
        # llama.cpp: an expert's width is expert_feed_forward_length, else feed_forward_length / expert_used_count
        n_ff_exp = (spec.n_ff_exp or spec.n_ff // n_used) if n_used else 0
        names = {t.name for t in spec.tensors}
        shared = next((t.shape[0] for t in spec.tensors if t.name.endswith(".ffn_up_shexp.weight")), 0)
        glm = arch == "glm4moe"
        # llama.cpp's build_moe_ffn arguments: qwen3moe passes softmax and norm_w = true; glm4moe reads its
        # expert_gating_func (sigmoid when absent), expert_weights_norm (false) and expert_weights_scale (none)
        gating = fields.get(f"{arch}.expert_gating_func", 2 if glm else 1)
        oss = arch == "gpt-oss"
        rope = _rope_scaling(spec, fields)
        return cls(arch=arch, n_layers=spec.n_layers, dim=spec.n_embd, n_head=spec.n_head,
                   n_head_kv=spec.n_head_kv, head_dim=spec.head_dim, ffn_dim=spec.n_ff, vocab=spec.n_vocab,
                   norm_eps=float(eps), rope_base=spec.rope.freq_base, rope_dim=spec.rope.dim or spec.head_dim,
                   rope_neox=arch in ("qwen2", "qwen3", "qwen3moe", "glm4moe", "gpt-oss"),
                   qkv_bias=arch == "qwen2" or ((glm or oss) and "blk.0.attn_q.bias" in names),
                   qk_norm=arch in ("qwen3", "qwen3moe") or (glm and "blk.0.attn_q_norm.weight" in names),
                   tied=spec.tied_output, n_expert=spec.n_expert, n_expert_used=n_used, n_ff_exp=n_ff_exp,
                   n_dense_lead=spec.n_layer_dense_lead, n_ff_shared=shared,
                   gating="softmax_weight" if oss else "sigmoid" if gating == 2 else "softmax",
                   probs_bias=any(n.endswith(".exp_probs_b.bias") for n in names),
                   norm_w=bool(fields.get(f"{arch}.expert_weights_norm", False)) if glm else not oss,
                   w_scale=float(fields.get(f"{arch}.expert_weights_scale", 0.0) or 1.0) if glm else 1.0,
                   n_nextn=spec.n_layer_nextn, window=(spec.sliding_window or 0) if oss else 0,
                   sliding=tuple(layer.sliding for layer in spec.kv_layers), sinks="blk.0.attn_sinks.weight" in names,
                   o_bias="blk.0.attn_output.bias" in names,
                   moe_bias=any(n.endswith(".ffn_gate_exps.bias") for n in names),
                   activation="oai" if oss else "silu", **rope)


def _rope_scaling(spec: Any, fields: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's RoPE scaling parameters for ``spec`` (llama-context.cpp, the context's cparams): linear and YaRN
    scale the angles by 1/factor; YaRN also mixes back the extrapolated angles of the fast dimensions
    (``ext_factor`` 1) and scales the rotation's magnitude, by ``attn_factor`` here (get_mscale(factor) divided by
    the 1 + 0.1 ln(factor) the kernel applies itself, times ``rope.scaling.attn_factor``)."""
    rope = spec.rope
    if rope.scaling_type not in ("linear", "yarn") or not rope.scaling_factor or rope.scaling_factor <= 0:
        return {}
    factor = float(rope.scaling_factor)
    out: dict[str, Any] = {"rope_freq_scale": 1.0 / factor}
    if rope.scaling_type == "yarn":
        arch = spec.arch
        mscale = 0.1 * math.log(factor) + 1.0 if factor > 1.0 else 1.0
        attn = mscale / (1.0 + 0.1 * math.log(factor)) * float(fields.get(f"{arch}.rope.scaling.attn_factor", 1.0))
        out.update(yarn_ext_factor=1.0, yarn_attn_factor=attn, yarn_orig_ctx=int(rope.original_ctx or 0))
    return out


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis, in float32 as llama.cpp computes it
    (:class:`.linear.Norm`, made by :meth:`prepare` once the weight is loaded)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.compute: Norm | None = None

    def prepare(self) -> Norm:
        self.compute = Norm(self)
        return self.compute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.compute is not None, "setup_cache() first"
        return self.compute(x)


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
        self.cfg = cfg
        self.freqs = torch.empty(0)
        self.positions = torch.empty(0)

    def build(self, device: torch.device) -> None:
        """The table ``exp(i * angle)``, (max_pos, 1, dim/2), computed in float64 on the CPU; with RoPE scaling the
        angles and magnitudes of ggml's ``rope_yarn`` (ggml-cpu/ops.cpp: ``rope_yarn``, ``rope_yarn_ramp``,
        ``ggml_rope_yarn_corr_dims`` with beta_fast 32 and beta_slow 1, llama.cpp's defaults)."""
        c = self.cfg
        inv = self.base ** (-torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim)  # (dim/2,)
        ang = torch.arange(self.max_pos, dtype=torch.float64)[:, None, None] * inv  # (max_pos, 1, dim/2)
        mag = torch.ones_like(ang)
        if c.rope_freq_scale != 1.0:
            interp = ang * c.rope_freq_scale
            if c.yarn_ext_factor:
                orig = c.yarn_orig_ctx or self.max_pos

                def corr(beta: float) -> float:  # the dim whose wavelength spans `beta` turns over orig positions
                    return self.dim * math.log(orig / (beta * 2 * math.pi)) / (2 * math.log(self.base))

                lo, hi = max(0.0, math.floor(corr(32.0))), min(self.dim - 1.0, math.ceil(corr(1.0)))
                i = torch.arange(self.dim // 2, dtype=torch.float64)  # i0 / 2
                ramp = 1 - ((i - lo) / max(0.001, hi - lo)).clamp(0, 1)  # (dim/2,)
                mix = ramp * c.yarn_ext_factor
                ang = interp * (1 - mix) + ang * mix
                mag = mag * (c.yarn_attn_factor * (1.0 + 0.1 * math.log(1.0 / c.rope_freq_scale)))
            else:
                ang = interp
        self.freqs = torch.polar(mag, ang).to(torch.complex64).to(device)
        self.positions = torch.arange(self.max_pos, device=device)  # masks a fixed-shape decode step

    def rotate_(self, x: torch.Tensor, pos: int | torch.Tensor) -> None:
        """Rotate ``x`` in place: (T, heads, head_dim) at positions ``[pos, pos + T)``, or (heads, head_dim) at
        ``pos`` (an int, or a one-element tensor for a fixed-shape step). Float32 is rotated as complex numbers
        where it lies; other dtypes through a float32 copy."""
        rot = x if self.dim == x.shape[-1] else x.narrow(-1, 0, self.dim)  # (..., heads, dim): the rotated part
        if isinstance(pos, torch.Tensor):
            f = self.freqs.index_select(0, pos).view(1, self.dim // 2)  # (1, 1, dim/2) -> (1, dim/2)
        else:  # (1, dim/2) for a decode step, else (T, 1, dim/2)
            f = self.freqs.select(0, pos) if x.dim() == 2 else self.freqs.narrow(0, pos, x.shape[0])
        if rot.dtype == torch.float32:
            # (..., heads, dim) -> (..., heads, dim/2, 2) -> complex (..., heads, dim/2), a view of x
            torch.view_as_complex(rot.unflatten(-1, (self.dim // 2, 2))).mul_(f)
        else:
            c = torch.view_as_complex(rot.float().unflatten(-1, (self.dim // 2, 2))) * f  # (..., heads, dim/2)
            rot.copy_(torch.view_as_real(c).flatten(-2))  # (..., heads, dim/2, 2) -> (..., heads, dim)


class Attention(nn.Module):
    """GQA attention with rotary positions over this part's KV cache: Q, K and V as one fused linear ``wqkv``, the
    output ``wo``, and per-head QK norms (qwen3). ``n_head`` and ``n_kv`` are this part's heads (tensor
    parallelism shrinks them with the linears)."""

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        hd = cfg.head_dim
        self.head_dim, self.n_head, self.n_kv = hd, cfg.n_head, cfg.n_head_kv
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.n_head_kv) * hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_head * hd, cfg.dim, bias=cfg.o_bias)
        # gpt-oss: sliding layers see the last `window` positions only (a key is masked when the query is `window`
        # or more positions after it, llama.cpp's LLAMA_SWA_TYPE_STANDARD); every layer has a learned sink logit per
        # query head, one more term in the softmax's denominator
        self.window = cfg.window if layer < len(cfg.sliding) and cfg.sliding[layer] else 0
        self.sinks = nn.Parameter(torch.empty(cfg.n_head)) if cfg.sinks else None
        self.sink: torch.Tensor | None = None  # the sinks as a step uses them, made by prepare()
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        # made by prepare() once the weights are loaded; plain attributes, as a decode step is a few hundred small
        # operations and looking a parameter or submodule up through nn.Module costs about 1 us
        self.qkv: Product | None = None  # wqkv as a step computes it (.linear)
        self.out: Product | None = None  # wo
        self.qk_norms: tuple[Norm, Norm] | None = None
        self.kv_cache = torch.empty(0)  # (2, n_kv, max_pos, head_dim): keys, then values, one copy per step
        self.k_cache = self.v_cache = self.kv_cache  # (n_kv, max_pos, head_dim) each: views of kv_cache
        self.scale = torch.empty(0)  # 1/sqrt(head_dim), a tensor (see .linear.Norm)

    def prepare(self, max_pos: int, dtype: torch.dtype, device: torch.device, split: int) -> None:
        """The KV cache, and the products and norms over the loaded weights (``split``: see :func:`.linear.weight`)."""
        self.kv_cache = torch.zeros(2, self.n_kv, max_pos, self.head_dim, dtype=dtype, device=device)
        self.k_cache, self.v_cache = self.kv_cache[0], self.kv_cache[1]
        self.qkv, self.out = weight(self.wqkv, device, split), weight(self.wo, device, split)
        self.qk_norms = None
        if self.q_norm is not None and self.k_norm is not None:
            self.qk_norms = (self.q_norm.prepare(), self.k_norm.prepare())
        self.scale = torch.tensor(1.0 / math.sqrt(self.head_dim), dtype=dtype, device=device)
        self.sink = self.sinks.detach().float() if self.sinks is not None else None  # (n_head,), this part's heads

    def forward(self, x: torch.Tensor, pos: int | torch.Tensor, rope: Rope,
                add: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of ``x`` (T, dim) at positions ``[pos, pos + T)`` over the cache, (T, dim); with tensor
        parallelism a partial sum. ``add``, a residual, is folded into the output product (one operation fewer:
        the decode steps of :mod:`.step` pass it). ``narrow`` and ``select`` rather than indexing, RoPE in place
        and one copy into the cache, and a decode step (T = 1) without its T axis: such a step is a few hundred
        small operations, and each view or index costs about a microsecond.

        A one-element tensor ``pos`` makes a decode step of fixed shapes: it attends over the whole cache with the
        positions after ``pos`` masked, so a CUDA graph captures it once and replays it for every token."""
        assert self.qkv is not None and self.out is not None, "setup_cache() first"
        T, hd, nh, nkv = x.shape[0], self.head_dim, self.n_head, self.n_kv
        fixed = isinstance(pos, torch.Tensor)
        group, heads = nh // nkv, nh + 2 * nkv  # query heads per KV head; Q, K and V heads
        # (T, heads * hd) -> (heads, hd) for a decode step, else (T, heads, hd); a fresh tensor: ours to change
        qkv = self.qkv(x).view(heads, hd) if T == 1 else self.qkv(x).view(T, heads, hd)
        d = qkv.dim() - 2  # the heads axis: Q heads [0, nh), K heads [nh, nh + nkv), V heads after
        if self.qk_norms is not None:
            q_norm, k_norm = self.qk_norms
            qkv.narrow(d, 0, nh).copy_(q_norm(qkv.narrow(d, 0, nh)))
            qkv.narrow(d, nh, nkv).copy_(k_norm(qkv.narrow(d, nh, nkv)))
        rope.rotate_(qkv.narrow(d, 0, nh + nkv), pos)
        if fixed:  # the new key and value, (2 nkv, hd) -> (2, nkv, 1, hd), into cache slot pos
            self.kv_cache.index_copy_(2, pos, qkv.narrow(0, nh, 2 * nkv).view(2, nkv, 1, hd))
            q = qkv.narrow(0, 0, nh).view(nkv, group, hd)  # (nh, hd) -> (nkv, group, hd)
            keys, vals = self.k_cache, self.v_cache  # (nkv, max_pos, hd)
        elif T == 1:  # (2 nkv, hd) -> (2, nkv, hd), into cache slot pos
            self.kv_cache.select(2, pos).copy_(qkv.narrow(0, nh, 2 * nkv).view(2, nkv, hd))
            q = qkv.narrow(0, 0, nh).view(nkv, group, hd)  # (nh, hd) -> (nkv, group, hd)
            keys, vals = self.k_cache.narrow(1, 0, pos + 1), self.v_cache.narrow(1, 0, pos + 1)  # (nkv, S, hd)
        else:  # (T, 2 nkv, hd) -> (T, 2, nkv, hd) -> (2, nkv, T, hd), into cache slots [pos, pos + T)
            self.kv_cache.narrow(2, pos, T).copy_(qkv.narrow(1, nh, 2 * nkv).view(T, 2, nkv, hd).permute(1, 2, 0, 3))
            # GQA without copying the cache: a KV group's query heads (and positions) are one batch row of queries:
            # (T, nh, hd) -> (T, nkv, group, hd) -> (nkv, group, T, hd) -> (nkv, group * T, hd)
            q = qkv.narrow(1, 0, nh).view(T, nkv, group, hd).permute(1, 2, 0, 3).reshape(nkv, group * T, hd)
            keys, vals = self.k_cache.narrow(1, 0, pos + T), self.v_cache.narrow(1, 0, pos + T)  # (nkv, S, hd)
        scores = torch.bmm(q, keys.transpose(1, 2)).mul_(self.scale)  # keys (nkv, hd, S); scores (nkv, group*T, S)
        w = self.window  # a sliding window: a key `w` or more positions before its query is masked
        if fixed:
            scores.masked_fill_(rope.positions > pos, float("-inf"))
            if w:
                scores.masked_fill_(rope.positions <= pos - w, float("-inf"))
        elif T > 1:  # query i sits at position pos + i and sees keys up to it
            S = pos + T
            ones = torch.ones(T, S, dtype=torch.bool, device=x.device)
            mask = ones.tril(diagonal=pos) & ones.triu(diagonal=pos - w + 1) if w else ones.tril(diagonal=pos)
            # (nkv, group * T, S) -> (nkv, group, T, S), masked, and back
            scores = scores.view(nkv, group, T, S).masked_fill(~mask, float("-inf")).view(nkv, group * T, S)
        elif w and pos >= w:
            scores.narrow(-1, 0, pos - w + 1).fill_(float("-inf"))
        if self.sink is not None:  # softmax over the keys and the head's sink logit, which takes no value
            sink = self.sink.view(nkv, group, 1).expand(nkv, group, scores.shape[1] // group)  # per query row
            both = torch.cat([scores.float(), sink.reshape(nkv, -1, 1).float()], dim=-1)
            probs = torch.softmax(both, dim=-1).narrow(-1, 0, scores.shape[-1]).to(q.dtype)
        elif scores.dtype == torch.float32:
            probs = torch.softmax(scores, dim=-1)
        else:
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.bmm(probs, vals)  # (nkv, group * T, hd)
        # the heads side by side: (nkv, group, hd) -> (1, nh * hd) for a decode step, else
        # (nkv, group, T, hd) -> (T, nkv, group, hd) -> (T, nh * hd)
        out = out.view(1, nh * hd) if T == 1 else out.view(nkv, group, T, hd).permute(2, 0, 1, 3).reshape(T, nh * hd)
        return self.out(out, add)


class Block(nn.Module):
    """One decoder layer. With tensor parallelism the attention's and the FFN's outputs are this member's partial
    sums; the hooks :func:`.parallel.apply_tp` adds all-reduce them over the stage's group."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        routed = cfg.n_expert and layer >= cfg.n_dense_lead
        self.ffn: FeedForward | MoEFeedForward = MoEFeedForward(cfg) if routed else FeedForward(cfg.dim, cfg.ffn_dim)

    def setup_cache(self, max_pos: int, dtype: torch.dtype, device: torch.device, split: int) -> None:
        self.attn_norm.prepare()
        self.attn.prepare(max_pos, dtype, device, split)
        self.ffn_norm.prepare()
        self.ffn.prepare(device, split)

    def forward(self, x: torch.Tensor, pos: int | torch.Tensor, rope: Rope) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), pos, rope)
        x = x + self.ffn(self.ffn_norm(x))
        return x


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
        raw, qtype = self.blocks[0]  # (rows, bytes per row)
        return quant.dequantize(raw.index_select(0, ids), qtype, self.block_cols, self.block_dtype)  # (T, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.shard:
            return self.lookup(ids)
        local = ids - self.start
        inside = (local >= 0) & (local < self.rows)
        out = self.lookup(local.clamp(0, self.rows - 1))  # (T, dim)
        return out * inside[:, None].to(out.dtype)  # inside (T,) -> (T, 1)


class Transformer(nn.Module):
    """Layers ``[start, end)`` of the model, plus the embedding and the output head when ``head`` is set (the
    stage that samples also embeds the next token, so both live together)."""

    def __init__(self, cfg: ModelConfig, layers: tuple[int, int], head: bool, max_pos: int) -> None:
        super().__init__()
        self.cfg, self.max_pos = cfg, max_pos
        run = min(layers[1], cfg.n_layers - cfg.n_nextn)  # llama.cpp's main graph runs no NextN layer either
        self.layers = nn.ModuleList(Block(cfg, il) for il in range(layers[0], run))
        self.rope = Rope(cfg, max_pos)
        self.embed = Embedding(cfg.vocab, cfg.dim) if head else None
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps) if head else None
        # a tied output is the embedding table itself (one copy; the planner counts one)
        self.output = nn.Linear(cfg.dim, cfg.vocab, bias=False) if head and not cfg.tied else None
        self._output: Product | None = None  # the output head as a step computes it, made by setup_cache
        # one-token steps, when faster: chosen by the builder (weights.build_part), not by the model
        self.step: Callable[[torch.Tensor, int], torch.Tensor] | None = None
        self.matvec: cpu_matvec.Choice | None = None  # the CPU's one-row product kernel (None off the CPU)

    def setup_cache(self, dtype: torch.dtype, device: torch.device, threads: int | None = None,
                    matvec: str | None = None) -> None:
        """KV caches and RoPE table on ``device``, and how the products and norms run, once the weights are loaded;
        on the CPU, the kernel of the one-row products over ``threads``: ``matvec`` (``"linear"`` or
        ``"rowblock"``) or else the one :func:`.cpu_matvec.choose` finds fastest here (or
        ``MIXRUN_TORCH_CPU_MATVEC`` forces; :func:`.linear.cpu_kernel`)."""
        threads = threads or torch.get_num_threads()
        self.rope.build(device)
        head = self.output if self.output is not None else self.embed  # a tied output is the embedding table
        linears = [m for blk in self.layers for m in (blk.attn.wqkv, blk.attn.wo, *blk.ffn.linears())]
        linears += [head] if head is not None else []
        self.matvec = cpu_kernel(linears, device, threads, matvec)
        split = row_split(self.matvec, threads)
        for blk in self.layers:
            blk.setup_cache(self.max_pos, dtype, device, split)
        if head is not None:
            self._output = weight(head, device, split)
        if self.norm is not None:
            self.norm.prepare()
        self.step = None  # the builder installs a faster one-token step where one fits (step.decode_step)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        assert self.embed is not None
        return self.embed(ids)

    def forward(self, x: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
        """Run this part's layers on hidden states ``x`` of positions ``[pos, pos + T)`` (a one-element tensor
        ``pos``: one decode step of fixed shapes, see :meth:`Attention.forward`); a one-token step at an int position
        goes through :attr:`step` when the builder installed one."""
        if self.step is not None and x.shape[0] == 1 and isinstance(pos, int):
            return self.step(x, pos)
        rope = self.rope
        for blk in self.layers:
            x = blk(x, pos, rope)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        assert self.norm is not None
        assert self._output is not None, "setup_cache() first"
        return self._output(self.norm(x)).float()  # (T, vocab or its shard)
