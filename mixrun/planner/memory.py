"""Bytes per device: weights, KV cache, compute buffers and runtime overhead, per backend and split.

Where llama.cpp puts things (checked against llama.cpp's own load-time buffer report, see
``benchmarks/llamacpp_memory.py`` and docs/benchmarks.md):
- ``token_embd`` (the input embedding) stays in host memory: the lookup runs on the CPU.
- The output layer (``output.weight``, or a duplicate of ``token_embd`` when the output is tied) and
  ``output_norm`` live with the last layer when every layer is offloaded (``-ngl`` > layers), else on the host.
- ``-sm layer``: each layer's weights and KV cache on the device that runs it.
- ``-sm row``: 2-D matrices split by ``-ts`` ratios; everything else, the whole KV cache and the compute buffers
  on the main GPU.
- ``-sm tensor``: matrices and KV heads split across devices by ``-ts`` ratios.
The torch backend keeps quantized matrices in their GGUF blocks on a GPU (dequantized one matrix at a time, right
before its product), so its weight bytes are the GGUF bytes; CPU ranks (``--simulate``) hold float32 copies. It shards ``token_embd`` and ``output`` over the vocabulary of the last stage,
as Megatron does, one table when they are tied: the last stage samples the next token, looks up its embedding and
sends the hidden state to the first stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from mixrun.model_spec import ModelSpec

MIB = 1 << 20
GIB = 1 << 30
# llama.cpp pads the KV cache's context to a multiple of this many cells.
KV_CTX_PAD = 256
# Fixed cost of a CUDA/ROCm context plus cuBLAS workspace per GPU process (observed 250-450 MiB); the torch
# backend's caching allocator and NCCL buffers add to it.
GPU_OVERHEAD_BYTES = {"llama.cpp": 400 * MIB, "torch": 700 * MIB}
F32 = 4
PLAIN_TYPES = frozenset({"F32", "F16", "BF16"})  # stored as plain floats, not in quant blocks


@dataclass(frozen=True)
class ModelFacts:
    """Per-layer byte and size facts derived once from a ModelSpec, so planning many candidates is cheap."""

    spec: ModelSpec
    kv_type: str

    @cached_property
    def layer_matrix_bytes(self) -> tuple[int, ...]:
        """Bytes of 2-D tensors per layer: what TP and row splits divide."""
        out = [0] * self.spec.n_layers
        for t in self.spec.tensors:
            if t.layer is not None and len(t.shape) >= 2:
                out[t.layer] += t.n_bytes
        return tuple(out)

    @cached_property
    def layer_other_bytes(self) -> tuple[int, ...]:
        """Bytes of 1-D tensors (norms, biases) per layer: replicated on every TP device."""
        return tuple(a - b for a, b in zip(self.spec.layer_bytes, self.layer_matrix_bytes, strict=True))

    @cached_property
    def embd_bytes(self) -> int:
        return self.spec.other_bytes.get("token_embd.weight", 0)

    @cached_property
    def layer_quant_bytes(self) -> tuple[int, ...]:
        """Bytes per layer of quantized (block) matrices: what the torch backend's fused kernels stream on a GPU."""
        out = [0] * self.spec.n_layers
        for t in self.spec.tensors:
            if t.layer is not None and len(t.shape) >= 2 and t.qtype not in PLAIN_TYPES:
                out[t.layer] += t.n_bytes
        return tuple(out)

    @cached_property
    def output_quant_bytes(self) -> int:
        """Bytes of the output projection (the embedding when tied) when quantized, else 0."""
        name = "output.weight" if not self.spec.tied_output else "token_embd.weight"
        t = next((t for t in self.spec.tensors if t.name == name), None)
        return t.n_bytes if t is not None and t.qtype not in PLAIN_TYPES else 0

    def quant_bytes(self, start: int, end: int, share: float = 1.0) -> float:
        return sum(self.layer_quant_bytes[start:end]) * share

    @cached_property
    def output_bytes(self) -> int:
        """The output projection plus output_norm; a tied output is a copy of token_embd."""
        out = self.spec.other_bytes.get("output.weight", self.embd_bytes if self.spec.tied_output else 0)
        return out + self.spec.other_bytes.get("output_norm.weight", 0)

    @cached_property
    def misc_bytes(self) -> int:
        """Non-layer tensors other than embedding/output (rope_freqs, ...): kept with the last layer."""
        skip = {"token_embd.weight", "output.weight", "output_norm.weight"}
        return sum(b for n, b in self.spec.other_bytes.items() if n not in skip)

    def kv_cells(self, ctx: int, ubatch: int, layer: int) -> int:
        """KV cells one layer allocates: the padded context, or the window (plus a ubatch) on sliding layers."""
        cells = math.ceil(ctx / KV_CTX_PAD) * KV_CTX_PAD
        if self.spec.kv_layers[layer].sliding and self.spec.sliding_window:
            cells = min(cells, math.ceil((self.spec.sliding_window + ubatch) / KV_CTX_PAD) * KV_CTX_PAD)
        return cells

    @cached_property
    def kv_bytes_per_cell(self) -> tuple[int, ...]:
        return tuple(self.spec.kv_bytes_per_token(self.kv_type, range(i, i + 1)) for i in range(self.spec.n_layers))

    def kv_bytes(self, ctx: int, ubatch: int, start: int, end: int) -> int:
        return sum(self.kv_cells(ctx, ubatch, i) * self.kv_bytes_per_cell[i] for i in range(start, end))

    def weights(self, start: int, end: int, share: float = 1.0) -> int:
        """Weight bytes of layers ``[start, end)`` for a device holding ``share`` of every matrix."""
        return int(sum(self.layer_matrix_bytes[start:end]) * share) + sum(self.layer_other_bytes[start:end])


# ---- compute buffers ---------------------------------------------------------------------------------------------


def compute_bytes(spec: ModelSpec, *, ctx: int, ubatch: int, n_layers: int, last: bool, flash_attn: bool,
                  share: float = 1.0) -> int:
    """Scratch memory of one device's slice of the graph for one ubatch (llama.cpp's "compute buffer").

    ggml's allocator reuses memory between ops, so the buffer is ``ubatch x`` the largest per-token live set of
    three phases (fitted on llama.cpp's own reports within 0-8% for real model shapes, see
    benchmarks/memory_vs_llamacpp.py): attention (the mask, the scores without flash attention, Q/K/V and the
    hidden state), the FFN (gate/up/down intermediates), and on the last device the logits. ``share`` is the
    device's fraction of heads and FFN rows under tensor parallelism.
    """
    if n_layers <= 0 and not last:
        return 0
    ub = min(ubatch, ctx)
    cells = math.ceil(ctx / KV_CTX_PAD) * KV_CTX_PAD
    n_head = max(1, math.ceil(spec.n_head * share))
    n_q = n_head * spec.head_dim
    n_kv_dim = max(1, math.ceil(spec.n_head_kv * share)) * spec.head_dim
    n_ff = max(1, math.ceil(spec.n_ff * share))
    mask = cells * (2 if flash_attn else F32)
    if spec.sliding_window:  # a second mask over the sliding-window cache (full-size, llama-cpp-python's default)
        mask *= 2
    q_terms = 3 if spec.arch in ("gemma2", "gemma3") else 2  # soft-capping adds a copy of the scores' inputs
    attn = mask + F32 * ((0 if flash_attn else n_head * cells) + 3 * spec.n_embd + q_terms * n_q + 2 * n_kv_dim + 5)
    ffn = mask + F32 * (5 * spec.n_embd + 3 * n_ff + 7)
    per_token = max(attn, ffn) if n_layers > 0 else 0
    if last:
        per_token = max(per_token, F32 * (spec.n_vocab + 2 * spec.n_embd + 1))
    return ub * per_token


def output_buffer_bytes(spec: ModelSpec, batch: int = 1) -> int:
    """Host buffer for the logits llama.cpp returns: vocab floats per sequence."""
    return spec.n_vocab * F32 * batch
