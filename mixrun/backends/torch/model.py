"""A Llama-family decoder in plain PyTorch, with no distributed code in it.

One sequence at a time (the chat case): activations are ``(T, dim)``. Architectures: llama (Mistral, SmolLM2 with
tied embeddings), qwen2 (QKV bias), qwen3 (QK norm, explicit head dim). A model object may hold only a slice of the
network: layers ``[start, end)``, with or without the embedding and the output head, so a pipeline stage builds just
its own part. Tensor parallelism is applied afterwards by :mod:`mixrun.backends.torch.parallel`, which shrinks the
linears to their shards; the head counts below are therefore read from the modules, never from the config.

RoPE layout: llama GGUFs store Q and K permuted for llama.cpp's "normal" rotation of adjacent pairs
``(x[2i], x[2i+1])``; qwen2/qwen3 GGUFs keep the NEOX layout, which rotates ``(x[i], x[i + d/2])``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ARCHS = ("llama", "qwen2", "qwen3")


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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Rope(nn.Module):
    """cos/sin tables for positions ``[0, max_pos)`` and the rotation of the first ``rope_dim`` features."""

    def __init__(self, cfg: ModelConfig, max_pos: int) -> None:
        super().__init__()
        self.dim, self.neox, self.base, self.max_pos = cfg.rope_dim, cfg.rope_neox, cfg.rope_base, max_pos
        self.cos = self.sin = torch.empty(0)

    def build(self, device: torch.device) -> None:
        """The tables, computed in float64 on the CPU (the model may have been built on the meta device)."""
        inv = self.base ** (-torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim)  # (dim/2,)
        ang = torch.arange(self.max_pos, dtype=torch.float64)[:, None] * inv[None, :]  # (max_pos, dim/2)
        self.cos, self.sin = ang.cos().float().to(device), ang.sin().float().to(device)

    def forward(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        # x: (T, heads, head_dim)
        T = x.shape[0]
        cos = self.cos[pos:pos + T, None, :].to(x.dtype)  # (T, 1, dim/2)
        sin = self.sin[pos:pos + T, None, :].to(x.dtype)
        rot, rest = x[..., :self.dim], x[..., self.dim:]
        if self.neox:
            a, b = rot[..., : self.dim // 2], rot[..., self.dim // 2:]
            rot = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
        else:
            a, b = rot[..., 0::2], rot[..., 1::2]  # adjacent pairs
            rot = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
        return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot


class Attention(nn.Module):
    """GQA attention with a preallocated KV cache. Head counts follow the linears' shapes (sharded or not)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hd = cfg.head_dim
        self.head_dim = hd
        self.wq = nn.Linear(cfg.dim, cfg.n_head * hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_head_kv * hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_head_kv * hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_head * hd, cfg.dim, bias=False)
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def setup_cache(self, max_pos: int, dtype: torch.dtype, device: torch.device) -> None:
        n_kv = self.wk.out_features // self.head_dim
        self.k_cache = torch.zeros(n_kv, max_pos, self.head_dim, dtype=dtype, device=device)  # (n_kv, S, hd)
        self.v_cache = torch.zeros(n_kv, max_pos, self.head_dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, pos: int, rope: Rope) -> torch.Tensor:
        T, hd = x.shape[0], self.head_dim
        q = self.wq(x).view(T, -1, hd)  # (T, n_head, hd)
        k = self.wk(x).view(T, -1, hd)  # (T, n_kv, hd)
        v = self.wv(x).view(T, -1, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, pos), rope(k, pos)
        assert self.k_cache is not None and self.v_cache is not None, "setup_cache() first"
        self.k_cache[:, pos:pos + T] = k.transpose(0, 1)
        self.v_cache[:, pos:pos + T] = v.transpose(0, 1)
        S = pos + T
        n_head, n_kv = q.shape[1], k.shape[1]
        group = n_head // n_kv
        # GQA without copying the cache: the query heads of a KV group attend to it together
        q = q.view(T, n_kv, group, hd).permute(1, 2, 0, 3)  # (n_kv, group, T, hd)
        keys = self.k_cache[:, None, :S]  # (n_kv, 1, S, hd)
        vals = self.v_cache[:, None, :S]
        scores = (q @ keys.transpose(-1, -2)) * (1.0 / math.sqrt(hd))  # (n_kv, group, T, S)
        if T > 1:  # query i sits at position pos + i and sees keys up to it
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=pos)  # (T, S)
            scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ vals  # (n_kv, group, T, hd)
        return self.wo(out.permute(2, 0, 1, 3).reshape(T, n_head * hd))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x: torch.Tensor, pos: int, rope: Rope) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), pos, rope)
        return x + self.ffn(self.ffn_norm(x))


class Embedding(nn.Module):
    """Token embedding over vocabulary rows ``[start, start + rows)``; ids outside give zeros (a vocab-parallel
    shard sums to the full lookup across its group)."""

    def __init__(self, rows: int, dim: int, start: int = 0) -> None:
        super().__init__()
        self.start = start
        self.weight = nn.Parameter(torch.empty(rows, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)  # (T, dim)
        return out * inside[:, None].to(out.dtype)


class Transformer(nn.Module):
    """Layers ``[start, end)`` of the model, plus the embedding and the output head when ``head`` is set (the
    stage that samples also embeds the next token, so both live together)."""

    def __init__(self, cfg: ModelConfig, layers: tuple[int, int], head: bool, max_pos: int) -> None:
        super().__init__()
        self.cfg, self.layer_range, self.max_pos = cfg, layers, max_pos
        self.layers = nn.ModuleList(Block(cfg) for _ in range(layers[1] - layers[0]))
        self.rope = Rope(cfg, max_pos)
        self.embed = Embedding(cfg.vocab, cfg.dim) if head else None
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps) if head else None
        self.output = nn.Linear(cfg.dim, cfg.vocab, bias=False) if head else None

    def setup_cache(self, dtype: torch.dtype, device: torch.device) -> None:
        self.rope.build(device)
        for blk in self.layers:
            blk.attn.setup_cache(self.max_pos, dtype, device)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        assert self.embed is not None
        return self.embed(ids)

    def forward(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """Run this part's layers on hidden states ``x`` of positions ``[pos, pos + T)``."""
        for blk in self.layers:
            x = blk(x, pos, self.rope)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        assert self.norm is not None and self.output is not None
        return self.output(self.norm(x)).float()  # (T, vocab or its shard)
