"""llama.cpp's ``-sm tensor`` placement, byte for byte: what each GPU holds for a ``-ts`` vector, and the ``-ts``
that reads fastest while everything fits.

Read from the llama.cpp vendored by llama-cpp-python 0.3.36 (``llama_meta_device_get_split_state`` in
src/llama-model.cpp; docs/llamacpp-placement.md has the details and citations):

- Q/K/V are split by output rows in whole GQA groups and ``attn_output`` by the matching input columns, in granules
  of ``lcm(n_gqa * head_dim, bperf)`` Q elements, ``bperf`` starting at the block size of ``attn_output``'s type
  and doubling while under 128 and ``bperf * n_dev < n_gqa * head_dim``; the KV cache is split the same way.
- ``ffn_gate``/``ffn_up`` rows and ``ffn_down`` input columns in granules of ``lcm(block of ffn_down, 128)``.
- ``output.weight`` by vocab rows, granule 1. Everything else (norms, biases, rope factors) is copied to every GPU;
  the token embedding stays on the CPU.
- Per tensor, the devices' cumulative ``-ts`` shares are taken in an order rotated by the layer index (``n_layer``
  for the output), each split point is rounded *down* to the granule, and the last device of that order takes the
  remainder. So the real shares drift from ``-ts`` (llama.cpp #28506), by up to a granule per tensor.
- Each GPU's compute buffer is sized for the whole, unsplit graph (the meta buffer type allocates the meta-level
  size on every device).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from mixrun.model.spec import ModelSpec

ATTN = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "attn_qkv.weight")
FFN = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "ffn_gate_up.weight")


def _block(qtype: str) -> int:
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0]
    except KeyError:
        return 1


def slices(n: int, granule: int, ts: Sequence[float], rotation: int) -> list[int]:
    """How many of ``n`` elements each device gets: cumulative ``ts`` in the rotated order, split points rounded down
    to ``granule``, the remainder to the last device of that order."""
    k = len(ts)
    order = [(j + rotation) % k for j in range(k)]
    total = sum(ts)
    out = [0] * k
    low, acc = 0, 0.0
    for j in order[:-1]:
        acc += ts[j]
        high = max(low, int(n * acc / total) // granule * granule)
        out[j], low = high - low, high
    out[order[-1]] = n - low
    return out


@dataclass(frozen=True)
class TensorPlacement:
    """Bytes per device (in ``-ts`` order) of one tensor split: weights, KV cache per context cell, and what a
    decode step reads (per layer the slowest device sets the pace, so per-layer reads are kept)."""

    weights: tuple[int, ...]
    kv_per_cell: tuple[tuple[int, ...], ...]  # [layer][device]
    layer_reads: tuple[tuple[int, ...], ...]  # [layer][device]
    output_reads: tuple[int, ...]


class TensorSplitModel:
    """The per-tensor facts of one model that every ``-ts`` evaluation reuses."""

    def __init__(self, spec: ModelSpec, kv_bytes_per_cell: Sequence[int]) -> None:
        self.spec = spec
        self.kv_bytes_per_cell = kv_bytes_per_cell

    @cached_property
    def _layers(self) -> list[list[tuple[str, int, int, int]]]:
        """Per layer: (kind, bytes, elements along the split axis, block size that sets the granule) of each
        tensor; kind "attn", "ffn" or "mirror"."""
        spec = self.spec
        by_name = {t.name: t for t in spec.tensors}
        out: list[list[tuple[str, int, int, int]]] = [[] for _ in range(spec.n_layers)]
        for t in spec.tensors:
            if t.layer is None:
                continue
            base = t.name.split(".", 2)[2]
            if base in ATTN:
                o = by_name.get(f"blk.{t.layer}.attn_output.weight")
                q_rows = spec.n_head * spec.head_dim
                out[t.layer].append(("attn", t.n_bytes, q_rows, _block(o.qtype) if o else 1))  # all follow Q's split
            elif base in FFN:
                d = by_name.get(f"blk.{t.layer}.ffn_down.weight")
                out[t.layer].append(("ffn", t.n_bytes, spec.n_ff, _block(d.qtype) if d else 1))
            else:
                out[t.layer].append(("mirror", t.n_bytes, 0, 0))
        return out

    @cached_property
    def _signatures(self) -> list[int]:
        """An id per layer, equal for layers with the same tensors and KV bytes (most layers of a model)."""
        ids: dict[tuple, int] = {}
        return [ids.setdefault((tuple(t), self.kv_bytes_per_cell[il]), len(ids)) for il, t in enumerate(self._layers)]

    def _attn_granule(self, block: int, n_dev: int) -> int:
        spec = self.spec
        group = max(1, spec.n_head // max(1, spec.n_head_kv)) * spec.head_dim
        bperf = block
        while bperf < 128 and bperf * n_dev < group:
            bperf *= 2
        return math.lcm(group, bperf)

    def place(self, ts: Sequence[float]) -> TensorPlacement:
        spec, n = self.spec, len(ts)
        weights = [0] * n
        kv_cells: list[tuple[int, ...]] = []
        reads: list[tuple[int, ...]] = []
        cache: dict[tuple[int, int, int], list[int]] = {}

        def granule(kind: str, block: int) -> int:
            return self._attn_granule(block, n) if kind == "attn" else math.lcm(block, 128) if kind == "ffn" else 1

        def cut(rows: int, granule: int, rotation: int) -> list[int]:
            key = (rows, granule, rotation)
            if key not in cache:
                cache[key] = slices(rows, granule, ts, rotation)
            return cache[key]

        done: dict[tuple[int, int], tuple[tuple[int, ...], tuple[int, ...]]] = {}
        q_rows = spec.n_head * spec.head_dim
        for il, sig in enumerate(self._signatures):
            key = (sig, il % n)  # layers of one signature at one rotation are placed alike: place each pair once
            if key not in done:
                rot = il % n
                layer = [0] * n
                attn_cut = None
                for kind, nbytes, rows, block in self._layers[il]:
                    if kind == "mirror":
                        for d in range(n):
                            layer[d] += nbytes
                        continue
                    parts = cut(rows, granule(kind, block), rot)
                    if kind == "attn":
                        attn_cut = parts
                    for d in range(n):
                        layer[d] += nbytes * parts[d] // rows
                attn_cut = attn_cut or cut(q_rows, self._attn_granule(1, n), rot)
                kv = tuple(self.kv_bytes_per_cell[il] * attn_cut[d] // q_rows for d in range(n))
                done[key] = (tuple(layer), kv)
            layer_t, kv_t = done[key]
            kv_cells.append(kv_t)
            for d in range(n):
                weights[d] += layer_t[d]
            reads.append(layer_t)
        out = [0] * n
        o = next((t for t in spec.tensors if t.name == "output.weight"), None)
        if o is not None:
            parts = cut(spec.n_vocab, 1, spec.n_layers % n)
            out = [o.n_bytes * parts[d] // spec.n_vocab for d in range(n)]
        elif spec.tied_output:  # a tied output: llama.cpp duplicates token_embd as the output, split by vocab rows
            e = next(t for t in spec.tensors if t.name == "token_embd.weight")
            parts = cut(spec.n_vocab, 1, spec.n_layers % n)
            out = [e.n_bytes * parts[d] // spec.n_vocab for d in range(n)]
        norm = spec.other_bytes.get("output_norm.weight", 0)
        misc = sum(b for name, b in spec.other_bytes.items()
                   if name not in ("token_embd.weight", "output.weight", "output_norm.weight"))
        for d in range(n):
            out[d] += norm
            weights[d] += out[d] + misc
        return TensorPlacement(weights=tuple(weights), kv_per_cell=tuple(kv_cells), layer_reads=tuple(reads),
                               output_reads=tuple(out))
