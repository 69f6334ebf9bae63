"""Tensor parallelism inside a pipeline stage, and the layout of stages over ranks, driven by the plan.

Sharding follows Megatron/gpt-fast: Q/K/V and gate/up are column-parallel (each rank keeps whole KV-head groups and
a block of FFN rows), the attention output and down projections are row-parallel with an all-reduce over the stage's
group after them, and the embedding and output head are split over the vocabulary. A mixture of experts is
expert-parallel inside the group instead: each member holds a contiguous run of whole experts (and the whole
router), and the same all-reduce sums the members' partial outputs. Unlike gpt-fast the shards are sized by the plan
(uneven allowed) and rank, group and sizes come in as arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from mixrun.alloc import allocate
from mixrun.backends.torch.ffn import FeedForward
from mixrun.backends.torch.model import Embedding, ModelConfig, Transformer
from mixrun.backends.torch.moe import MoEFeedForward

if TYPE_CHECKING:
    from mixrun.planner.types import Group


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: devices (one rank each) doing TP over layers ``[start, end)`` with these KV heads each."""

    devices: tuple[str, ...]
    layers: tuple[int, int]
    kv_heads: tuple[int, ...]

    @property
    def tp(self) -> int:
        return len(self.devices)


@dataclass(frozen=True)
class Layout:
    """Stages in pipeline order. Global ranks number the stages' devices in order; the last stage embeds tokens
    and computes logits, and its first rank (the driver) samples and talks to the controller."""

    stages: tuple[Stage, ...]

    @property
    def world(self) -> int:
        return sum(s.tp for s in self.stages)

    def first_rank(self, stage: int) -> int:
        return sum(s.tp for s in self.stages[:stage])

    def ranks(self, stage: int) -> list[int]:
        a = self.first_rank(stage)
        return list(range(a, a + self.stages[stage].tp))

    def locate(self, rank: int) -> tuple[int, int]:
        """(stage index, member index) of a global rank."""
        for i, s in enumerate(self.stages):
            a = self.first_rank(i)
            if a <= rank < a + s.tp:
                return i, rank - a
        raise ValueError(f"rank {rank} is outside a world of {self.world}")

    @property
    def driver(self) -> int:
        return self.first_rank(len(self.stages) - 1)

    def devices(self) -> list[str]:
        return [d for s in self.stages for d in s.devices]

    def to_json(self) -> list[dict[str, Any]]:
        return [{"devices": list(s.devices), "layers": list(s.layers), "kv_heads": list(s.kv_heads)}
                for s in self.stages]

    @classmethod
    def from_json(cls, data: list[dict[str, Any]]) -> Layout:
        return cls(tuple(Stage(tuple(s["devices"]), (int(s["layers"][0]), int(s["layers"][1])),
                               tuple(int(k) for k in s["kv_heads"])) for s in data))

    @classmethod
    def from_groups(cls, groups: Sequence[Group], n_head_kv: int) -> Layout:
        """From a plan's groups, with the whole KV heads the plan gave each member as they are (a lone device,
        whose group names none, holds all ``n_head_kv``)."""
        stages = []
        for g in groups:
            kv = tuple(g.kv_heads) or ((n_head_kv,) if len(g.devices) == 1 else ())
            if len(kv) != len(g.devices):
                raise ValueError(f"group {list(g.devices)}: KV heads {list(kv)} are not one per member (a torch "
                                 "plan's TP groups carry them)")
            stages.append(Stage(tuple(g.devices), tuple(g.layers), kv))
        return cls(tuple(stages))

    def check(self, cfg: ModelConfig) -> None:
        prev = 0
        for s in self.stages:
            if s.layers[0] != prev or s.layers[1] <= s.layers[0]:
                raise ValueError(f"stages {[list(x.layers) for x in self.stages]} do not cover layers "
                                 f"[0, {cfg.n_layers}) contiguously")
            prev = s.layers[1]
            if len(s.kv_heads) != s.tp or sum(s.kv_heads) != cfg.n_head_kv or min(s.kv_heads) < 1:
                raise ValueError(f"stage {list(s.devices)}: KV heads {list(s.kv_heads)} must be at least 1 each "
                                 f"and sum to {cfg.n_head_kv}")
        if prev != cfg.n_layers:
            raise ValueError(f"stages end at layer {prev}, the model has {cfg.n_layers}")


class Comm:
    """A stage's TP group and what went through it: bytes all-reduced by this rank (layers, and the vocab-parallel
    embedding and logits apart, so the per-layer traffic can be checked against theory)."""

    def __init__(self, group: Any, size: int) -> None:
        self.group, self.size = group, size
        self.layer_bytes = 0
        self.vocab_bytes = 0

    def all_reduce(self, t: torch.Tensor, layer: bool = True) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(t, group=self.group)
            n = t.numel() * t.element_size()
            if layer:
                self.layer_bytes += n
            else:
                self.vocab_bytes += n
        return t

    def gather_vocab(self, local: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Concatenate every member's logits shard (uneven sizes: padded to the largest for all_gather)."""
        if self.size == 1:
            return local
        width = max(sizes)
        pad = torch.zeros(local.shape[0], width, dtype=local.dtype, device=local.device)
        pad[:, : local.shape[1]] = local
        parts = [torch.empty_like(pad) for _ in sizes]
        dist.all_gather(parts, pad, group=self.group)
        self.vocab_bytes += pad.numel() * pad.element_size() * (self.size - 1)
        return torch.cat([p[:, :n] for p, n in zip(parts, sizes, strict=True)], dim=1)


@dataclass(frozen=True)
class Shard:
    """Which slice of a GGUF tensor a parameter holds: rows or columns ``[start, stop)`` (``dim`` 0 or 1 of the
    row-major ``(out, in)`` weight), or all of it when ``dim`` is None."""

    dim: int | None = None
    start: int = 0
    stop: int = 0


def _linear(old: nn.Linear, in_f: int, out_f: int, bias: bool = True) -> nn.Linear:
    """``old`` resized; ``bias``: keep its bias (a row-parallel product's bias is added by one member only, or the
    all-reduce would add it once per member)."""
    return nn.Linear(in_f, out_f, bias=bias and old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)


def _all_reduced(comm: Comm) -> Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]:
    """A forward hook that all-reduces a row-parallel module's output (this member's partial sum) in place."""

    def hook(_module: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
        return comm.all_reduce(out)

    return hook


def apply_tp(model: Transformer, stage: Stage, member: int, comm: Comm) -> dict[str, tuple[Shard, ...]]:
    """Shrink ``model``'s linears to this member's shard and add the all-reduces (forward hooks on each layer's
    attention and FFN, whose outputs are then partial sums; the decode steps of :mod:`.step`, which call past the
    hooks, take ``comm.all_reduce`` from the builder); returns the slices each parameter takes from its GGUF
    tensors, in row order (parameters absent from the dict hold whole tensors).

    Run it on a model built on the meta device, before loading weights: nothing full-sized is ever allocated.
    """
    cfg = model.cfg
    hd, group = cfg.head_dim, cfg.n_head // cfg.n_head_kv
    kv = stage.kv_heads
    kv0 = sum(kv[:member])
    q = Shard(0, kv0 * group * hd, (kv0 + kv[member]) * group * hd)
    k = Shard(0, kv0 * hd, (kv0 + kv[member]) * hd)
    ffn = allocate(cfg.ffn_dim, kv)  # FFN rows follow the KV heads, as the planner's shares assume
    f = Shard(0, sum(ffn[:member]), sum(ffn[: member + 1]))
    shards: dict[str, tuple[Shard, ...]] = {}
    experts = expert_counts(cfg, stage)
    e0, e1 = sum(experts[:member]), sum(experts[: member + 1])
    shared = allocate(cfg.n_ff_shared, kv) if cfg.n_ff_shared else []  # a shared expert's rows, as the FFN's
    fs = Shard(0, sum(shared[:member]), sum(shared[: member + 1])) if shared else None
    for i, blk in enumerate(model.layers):
        a, ff = blk.attn, blk.ffn
        p = f"layers.{i}."
        if stage.tp > 1:
            a.n_head, a.n_kv = kv[member] * group, kv[member]
            a.wqkv = _linear(a.wqkv, cfg.dim, (a.n_head + 2 * a.n_kv) * hd)
            a.wo = _linear(a.wo, a.n_head * hd, cfg.dim, bias=member == 0)
            if a.sinks is not None:  # this member's query heads' sinks
                a.sinks = nn.Parameter(torch.empty(a.n_head, device=a.wo.weight.device, dtype=a.wo.weight.dtype))
            if isinstance(ff, FeedForward):
                ff.w13 = _linear(ff.w13, cfg.dim, 2 * (f.stop - f.start))
                ff.w2 = _linear(ff.w2, f.stop - f.start, cfg.dim)
            else:  # expert parallel: this member's experts, whole, and its rows of a shared expert
                with torch.device(a.wo.weight.device):  # the meta device: nothing allocated
                    width = fs.stop - fs.start if fs is not None else None
                    blk.ffn = ff = MoEFeedForward(cfg, e0, e1 - e0, width).to(a.wo.weight.dtype)
            a.register_forward_hook(_all_reduced(comm))
            ff.register_forward_hook(_all_reduced(comm))
        shards[p + "attn.wqkv.weight"] = shards[p + "attn.wqkv.bias"] = (q, k, k)
        shards[p + "attn.wo.weight"] = (Shard(1, q.start, q.stop),)
        shards[p + "attn.sinks"] = (Shard(0, kv0 * group, (kv0 + kv[member]) * group),)
        if isinstance(ff, FeedForward):
            shards[p + "ffn.w13.weight"] = (f, f)
            shards[p + "ffn.w2.weight"] = (Shard(1, f.start, f.stop),)
        else:  # rows of the stacked (n_expert * rows, cols) tensors: always sliced, as the GGUF's are 3-D
            fe = cfg.n_ff_exp
            shards[p + "ffn.gate_exps.weight"] = shards[p + "ffn.up_exps.weight"] = (Shard(0, e0 * fe, e1 * fe),)
            shards[p + "ffn.down_exps.weight"] = (Shard(0, e0 * cfg.dim, e1 * cfg.dim),)
            for name in ("gate", "up", "down"):  # gpt-oss's (n_expert, rows) biases: this member's experts' rows
                shards[p + f"ffn.{name}_exps.bias"] = (Shard(0, e0, e1),)
            if fs is not None:
                shards[p + "ffn.shared.w13.weight"] = (fs, fs)
                shards[p + "ffn.shared.w2.weight"] = (Shard(1, fs.start, fs.stop),)
    if model.embed is not None:
        vocab = vocab_sizes(cfg, stage)
        v0, v1 = sum(vocab[:member]), sum(vocab[: member + 1])
        old = model.embed.weight  # the run dtype, kept: a dense (F32/F16) table or output must not stay float32
        model.embed = Embedding(v1 - v0, cfg.dim, start=v0, shard=stage.tp > 1).to(old.device, old.dtype)
        if model.output is not None:  # untied: its own vocabulary shard
            model.output = nn.Linear(cfg.dim, v1 - v0, bias=False, device=model.output.weight.device,
                                     dtype=model.output.weight.dtype)
        shards["embed.weight"] = shards["output.weight"] = (Shard(0, v0, v1),)
    return {k: v for k, v in shards.items() if _has(model, k)}


def expert_counts(cfg: ModelConfig, stage: Stage) -> list[int]:
    """Each member's routed experts (a contiguous run, in member order), in proportion to its KV heads as the FFN
    rows are, at least one each where there are enough; empty for a dense model."""
    if not cfg.n_expert:
        return []
    return allocate(cfg.n_expert, stage.kv_heads, minimum=1 if cfg.n_expert >= stage.tp else 0)


def vocab_sizes(cfg: ModelConfig, stage: Stage) -> list[int]:
    """Each member's rows of the vocabulary-parallel embedding and output, in proportion to its KV heads."""
    return allocate(cfg.vocab, stage.kv_heads)


def _has(model: nn.Module, name: str) -> bool:
    try:
        return model.get_parameter(name) is not None
    except AttributeError:
        return False
