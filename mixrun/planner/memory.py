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
- With llama.cpp's CPU "extra" buffer types in force on the host (``Host.llamacpp_extra_buffers``), the weights it
  multiplies on the CPU are held twice there: a repacked copy in an ``AMX``/``CPU_REPACK`` buffer beside the mapped
  file, which still covers them (:class:`ExtraBuffers`).
The torch backend keeps quantized matrices in their GGUF blocks on a GPU (dequantized one matrix at a time, right
before its product), so its weight bytes are the GGUF bytes; CPU ranks (``--simulate``) hold float32 copies. It shards ``token_embd`` and ``output`` over the vocabulary of the last stage,
as Megatron does, one table when they are tied: the last stage samples the next token, looks up its embedding and
sends the hidden state to the first stage.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Collection
from dataclasses import dataclass
from functools import cached_property

from mixrun.model.spec import ModelSpec, TensorSpec
from mixrun.planner import compute_graph

MIB = 1 << 20
GIB = 1 << 30
# llama.cpp pads the KV cache's context to a multiple of this many cells.
KV_CTX_PAD = 256
# Fixed cost of a CUDA/ROCm context plus cuBLAS workspace per GPU process (observed 250-450 MiB); the torch
# backend's caching allocator and NCCL buffers add to it.
GPU_OVERHEAD_BYTES = {"llama.cpp": 400 * MIB, "torch": 700 * MIB}
F32 = 4
PLAIN_TYPES = frozenset({"F32", "F16", "BF16"})  # stored as plain floats, not in quant blocks
PLAIN_KV = frozenset({"f32", "f16", "bf16"})  # KV-cache types that are not quantized


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

    def kv_cells(self, ctx: int, ubatch: int, layer: int, full: bool = False) -> int:
        """KV cells one layer allocates: the padded context, or the window (plus a ubatch) on sliding layers unless
        ``full`` (the torch backend keeps every layer's cache at the whole context)."""
        cells = math.ceil(ctx / KV_CTX_PAD) * KV_CTX_PAD
        if self.spec.kv_layers[layer].sliding and self.spec.sliding_window and not full:
            cells = min(cells, math.ceil((self.spec.sliding_window + ubatch) / KV_CTX_PAD) * KV_CTX_PAD)
        return cells

    @cached_property
    def kv_bytes_per_cell(self) -> tuple[int, ...]:
        return tuple(self.spec.kv_bytes_per_token(self.kv_type, range(i, i + 1)) for i in range(self.spec.n_layers))

    def kv_bytes(self, ctx: int, ubatch: int, start: int, end: int, full: bool = False) -> int:
        return sum(self.kv_cells(ctx, ubatch, i, full) * self.kv_bytes_per_cell[i] for i in range(start, end))

    def weights(self, start: int, end: int, share: float = 1.0) -> int:
        """Weight bytes of layers ``[start, end)`` for a device holding ``share`` of every matrix."""
        return int(sum(self.layer_matrix_bytes[start:end]) * share) + sum(self.layer_other_bytes[start:end])

    # ---- mixtures of experts (zeros for dense models) ----

    @cached_property
    def expert_bytes(self) -> tuple[int, ...]:
        """Routed-expert bytes per layer: what a MoE plan may hold in host RAM apart from the rest of the layer."""
        return self.spec.layer_expert_bytes

    @cached_property
    def active_expert_bytes(self) -> tuple[float, ...]:
        """Routed-expert bytes a batch-1 decode step reads per layer (``used / count`` of them)."""
        return tuple(float(d - self.spec.layer_dense_bytes[i]) for i, d in enumerate(self.spec.layer_decode_bytes))

    @cached_property
    def moe_layers(self) -> tuple[int, ...]:
        """Layers with routed experts."""
        return tuple(i for i, e in enumerate(self.expert_bytes) if e)

    @cached_property
    def _expert_tally(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        params, experts, largest = ([0] * self.spec.n_layers for _ in range(3))
        for t in self.spec.tensors:
            if t.layer is None or t.layer >= self.spec.n_layers:
                continue
            params[t.layer] += t.n_elements
            if t.routed_expert:
                experts[t.layer] += t.n_elements
                largest[t.layer] = max(largest[t.layer], t.n_bytes)
        return tuple(params), tuple(experts), tuple(largest)

    @cached_property
    def expert_params(self) -> tuple[int, ...]:
        """Routed-expert parameters per layer."""
        return self._expert_tally[1]

    @cached_property
    def dense_params(self) -> tuple[int, ...]:
        """Parameters per layer other than the routed experts."""
        return tuple(p - e for p, e in zip(self._expert_tally[0], self._expert_tally[1], strict=True))

    @cached_property
    def active_params(self) -> tuple[float, ...]:
        """Parameters one token multiplies per layer: the dense ones plus ``used / count`` of the experts'."""
        spec = self.spec
        used = [spec.layer_expert_used[i] if i < len(spec.layer_expert_used) else spec.n_expert_used
                for i in range(spec.n_layers)]
        return tuple(d + e * u / max(1, spec.n_expert)
                     for d, e, u in zip(self.dense_params, self.expert_params, used, strict=True))

    @cached_property
    def largest_expert_tensor(self) -> tuple[int, ...]:
        """Per layer, its largest routed-expert tensor: what op_offload copies to the GPU at a time."""
        return self._expert_tally[2]


# ---- llama.cpp's CPU extra buffer types (repacked weights) -------------------------------------------------------
# Read from llama.cpp's source as vendored by llama-cpp-python 0.3.36 (see docs/cost-model.md, "Repacked weights").

# ggml's TENSOR_ALIGNMENT: the AMX and CPU_REPACK buffer types pad every tensor to it (ggml-alloc.c
# ggml_backend_alloc_ctx_tensors_from_buft_impl), and GGUF's default general.alignment pads tensor data in the file.
TENSOR_ALIGNMENT = 32
# The order llama.cpp tries them for a weight (ggml-cpu.cpp ggml_backend_cpu_get_extra_buffer_types: AMX first, then
# CPU_REPACK); the first whose supports_op accepts the weight's MUL_MAT takes it (llama-model-loader.cpp
# select_weight_buft). Other names (Arm's KleidiAI, RISC-V's SpacemiT) are not modelled: they count nothing.
EXTRA_BUFFER_ORDER = ("AMX", "CPU_REPACK")
# AMX (ggml-cpu/amx/amx.cpp extra_buffer_type::supports_op): the weight's rows (op->ne[0]) a multiple of 2 x TILE_N,
# its row length (ne[0]) a multiple of an alignment per type. Per type: (row alignment, elements per block, extra
# bytes per block in the packed copy). amx/mmq.cpp ggml_backend_amx_get_alloc_size / get_row_size: Q8_0 keeps an
# int32 compensation per block, Q4_K/Q5_K 4 bytes of unpacked scales, IQ4_XS 2; F16 is copied as is.
AMX_ROWS = 32
AMX_TYPES = {"Q4_0": (32, 32, 0), "Q4_1": (32, 32, 0), "Q8_0": (32, 32, 4), "Q4_K": (256, 256, 4),
             "Q5_K": (256, 256, 4), "Q6_K": (256, 256, 0), "IQ4_XS": (256, 256, 2), "F16": (16, 1, 0)}
# CPU_REPACK on x86-64 (ggml-cpu/repack.cpp ggml_repack_get_optimal_repack_type): the types with an AVX2 layout, all
# interleaving 8 rows, so rows must be a multiple of 8; Q2_K needs AVX-512 and is counted as if the host had it (an
# AVX2-only host then holds less than planned, never more). The copy is ggml_nbytes (no get_alloc_size). Arm's NEON
# layouts (Q4_0, Q4_K, Q5_K, Q6_K, Q8_0, IQ4_NL, MXFP4) are not modelled: profiles do not say the ISA.
CPU_REPACK_TYPES = frozenset({"Q4_0", "Q4_K", "IQ4_NL", "MXFP4", "Q2_K"})
CPU_REPACK_ROWS = 8


def _pad(n: int) -> int:
    return -(-n // TENSOR_ALIGNMENT) * TENSOR_ALIGNMENT


def is_matmul_weight(t: TensorSpec) -> bool:
    """A weight llama.cpp multiplies (MUL_MAT): every 2-D tensor of the plannable architectures but the input
    embedding, which is looked up (GET_ROWS) and so never leaves the mapped buffer."""
    return len(t.shape) == 2 and t.name != "token_embd.weight"


def extra_buffer_for(t: TensorSpec, types: Collection[str]) -> str | None:
    """The extra buffer type llama.cpp puts matrix ``t`` in on a host using ``types``, or None (mapped file)."""
    rows, cols = t.shape[0], t.shape[-1]  # ggml's ne[1], ne[0]
    for name in EXTRA_BUFFER_ORDER:
        if name not in types:
            continue
        if name == "AMX" and t.qtype in AMX_TYPES and rows % AMX_ROWS == 0 and cols % AMX_TYPES[t.qtype][0] == 0:
            return name
        if name == "CPU_REPACK" and t.qtype in CPU_REPACK_TYPES and rows % CPU_REPACK_ROWS == 0:
            return name
    return None


def extra_copy_bytes(t: TensorSpec, buffer_type: str) -> int:
    """Bytes of ``t``'s repacked copy in ``buffer_type``, padded as the buffer lays it out."""
    if buffer_type == "AMX":
        _align, block, extra = AMX_TYPES[t.qtype]
        return _pad(t.n_bytes + t.n_elements // block * extra)
    return _pad(t.n_bytes)


@dataclass(frozen=True)
class ExtraBuffers:
    """What llama.cpp's CPU extra buffer types hold of one model on one host.

    With them in force, each matrix the CPU multiplies goes to the first extra buffer type that takes it (as a
    repacked copy, resident memory), and the default CPU buffer maps the file from its first to its last remaining
    tensor (llama-model.cpp ``load_tensors``; llama-model-loader.cpp ``get_mapping_range``), so weights moved out
    from between mapped ones are still counted there, and only those beyond either end drop out. A tied output is
    created under the output's name in the extra buffer and so is a repacked copy of ``token_embd``, which stays
    mapped for the lookup (llama-model-loader.cpp ``create_tensor``, ``TENSOR_DUPLICATED``). ``types`` empty: off.
    """

    spec: ModelSpec
    types: tuple[str, ...] = ()

    @cached_property
    def copies(self) -> dict[str, tuple[str, int]]:
        """Tensor name -> (buffer type, bytes of its copy) for each weight an extra buffer takes; a tied output is
        listed as ``output.weight``."""
        out: dict[str, tuple[str, int]] = {}
        if not self.types:
            return out
        for t in self.spec.tensors:
            is_output = self.spec.tied_output and t.name == "token_embd.weight"
            if is_matmul_weight(t) or is_output:
                buft = extra_buffer_for(t, self.types)
                if buft is not None:
                    out["output.weight" if is_output else t.name] = (buft, extra_copy_bytes(t, buft))
        return out

    @cached_property
    def layer_bytes(self) -> tuple[int, ...]:
        """Bytes of the repacked copies per layer."""
        out = [0] * self.spec.n_layers
        for t in self.spec.tensors:
            if t.layer is not None and t.name in self.copies:
                out[t.layer] += self.copies[t.name][1]
        return tuple(out)

    @cached_property
    def output_bytes(self) -> int:
        """Bytes of the output projection's repacked copy (of ``token_embd`` when tied), when an extra buffer takes it."""
        return self.copies.get("output.weight", ("", 0))[1]

    def by_type(self, layers: range, output: bool) -> dict[str, int]:
        """Bytes per extra buffer type for a CPU holding ``layers`` (and the output), as llama.cpp's load report
        lists its ``AMX``/``CPU_REPACK`` model buffers."""
        out: dict[str, int] = {}
        for t in self.spec.tensors:
            name = "output.weight" if self.spec.tied_output and t.name == "token_embd.weight" else t.name
            held = t.layer in layers if t.layer is not None else output
            if held and name in self.copies:
                buft, size = self.copies[name]
                out[buft] = out.get(buft, 0) + size
        return out

    def unmapped_bytes(self, layers: range, output: bool) -> int:
        """GGUF bytes of the CPU's moved weights that lie outside the mapped range (before its first or after its last
        mapped tensor, in file order): what the default CPU buffer no longer covers."""
        moved = []  # (file position, bytes) of weights the CPU holds in an extra buffer
        first = last = None  # file positions of the first and last tensor the CPU keeps mapped
        for i, t in enumerate(self.spec.tensors):
            held = t.name == "token_embd.weight" or (t.layer in layers if t.layer is not None else output)
            if not held:
                continue
            if t.name in self.copies:
                moved.append((i, t.n_bytes))
            else:
                first = i if first is None else first
                last = i
        if first is None:
            return sum(b for _, b in moved)
        return sum(b for i, b in moved if i < first or i > last)

    def host_bytes(self, layers: range, output: bool) -> int:
        """What the extra buffers add on the CPU to the GGUF bytes of the tensors it holds: the repacked copies, less
        the moved weights the mapped range no longer covers."""
        if not self.copies:
            return 0
        return sum(self.by_type(layers, output).values()) - self.unmapped_bytes(layers, output)


# ---- compute buffers ---------------------------------------------------------------------------------------------


def compute_bytes(spec: ModelSpec, *, ctx: int, ubatch: int, n_layers: int, last: bool, flash_attn: bool,
                  share: float = 1.0, start: int = 0, first: bool | None = None, swa_full: bool = False,
                  kv_type: str = "f16") -> int:
    """Scratch memory of one device's slice of the graph for one ubatch (llama.cpp's "compute buffer").

    Found as llama.cpp finds it: ggml's graph allocator replayed over the graph of the device's layers
    ``[start, start + n_layers)`` (planner/compute_graph.py). ``first``: the slice starts the model (the token
    lookup's inputs are its own; default: ``start == 0``); ``last``: it ends it with the output layer. ``share`` is
    the device's fraction of heads and FFN rows under tensor parallelism. ``swa_full``: sliding-window layers keep a
    full-size cache (llama.cpp's ``--swa-full``), so their mask spans the whole context. A quantized ``kv_type``
    adds llama.cpp's Hadamard rotations of Q, K and V.
    """
    end = min(spec.n_layers, start + max(0, n_layers))
    if end <= start and not last:
        return 0
    ub = min(ubatch, ctx)
    cells = math.ceil(ctx / KV_CTX_PAD) * KV_CTX_PAD
    swa_cells = cells
    if spec.sliding_window and not swa_full:
        swa_cells = min(cells, math.ceil((spec.sliding_window + ub) / KV_CTX_PAD) * KV_CTX_PAD)
    return compute_graph.graph_bytes(_dims(spec, share), ubatch=ub, cells=cells, swa_cells=swa_cells,
                                     flash_attn=flash_attn, start=start, n_layers=max(0, end - start),
                                     first=start == 0 if first is None else first, last=last,
                                     quantized_kv=kv_type not in PLAIN_KV)


# ModelSpec hashes every tensor it lists, so the graph dimensions are cached per spec object, not by its hash
_DIMS: dict[int, tuple[weakref.ref[ModelSpec], dict[float, compute_graph.Dims]]] = {}


def _dims(spec: ModelSpec, share: float) -> compute_graph.Dims:
    key = id(spec)
    entry = _DIMS.get(key)
    if entry is None or entry[0]() is not spec:
        entry = (weakref.ref(spec, lambda _ref: _DIMS.pop(key, None)), {})
        _DIMS[key] = entry
    by_share = entry[1]
    if share not in by_share:
        by_share[share] = compute_graph.dims_for(spec, share)
    return by_share[share]


def output_buffer_bytes(spec: ModelSpec, batch: int = 1) -> int:
    """Host buffer for the logits llama.cpp returns: vocab floats per sequence."""
    return spec.n_vocab * F32 * batch
