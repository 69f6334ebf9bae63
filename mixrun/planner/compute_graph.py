"""llama.cpp's compute buffer, found the way ggml finds it: by allocating the graph of one ubatch.

llama.cpp sizes its compute buffer by running ggml's graph allocator over the graph it builds for a full ubatch
(``sched_reserve``). The allocator (ggml/src/ggml-alloc.c, as vendored by llama-cpp-python 0.3.36) walks the
nodes in order and

- allocates the graph's inputs first (``ggml_gallocr_alloc_graph_impl``: leafs, then inputs);
- gives each node the best-fitting free block other than the last one, else the end of the buffer
  (``ggml_dyn_tallocr_alloc``), sizes rounded up to the buffer's alignment;
- lets an op that can work in place (``ggml_op_can_inplace``: add, mul, rms_norm, rope, soft_max, unary, scale,
  clamp, add_id, ...) take over a parent's memory when the parent is its own (not a view), not an output, of the
  same size, and this node is its last consumer (``ggml_gallocr_allocate_node``);
- frees a tensor once its last consumer has run, merging it with neighbouring free blocks
  (``ggml_dyn_tallocr_free_bytes``); a view keeps its source alive until the view's own consumers have run.

The buffer is the highest address ever used. Fragmentation matters: a 2-layer model with 64-wide hidden states
needs a quarter more than the sum of its largest live tensors would say. So this module replays that allocator
over the graph llama.cpp's model code builds (src/models/*.cpp and llama-graph.cpp ``build_attn``,
``build_ffn``, ``build_moe_ffn``), node for node in its execution order, for the tensors that live in the compute
buffer. Weights and the KV cache live elsewhere and are left out; so are ops that change nothing in the allocation
(an in-place bias add or scale on a tensor with one consumer). The node order was read off llama.cpp's own graphs
with an eval callback (see docs/benchmarks.md, "Compute buffers"); the result matches llama.cpp's reported buffer
for the tiny and full-size models in benchmarks/memory_vs_llamacpp.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from mixrun.model.spec import ModelSpec

F32 = 4
KV_CTX_PAD = 256  # llama.cpp pads the KV cache's cells (and so the mask's rows) to a multiple of this
CPU_ALIGNMENT = 32  # ggml-impl.h TENSOR_ALIGNMENT: the CPU buffer type's alignment (CUDA's is 128)
EXTERNAL = -1  # a view of a tensor outside the compute buffer (the KV cache)


class Graph:
    """The compute-buffer tensors of one graph, in execution order: sizes, sources, views, in-place ops."""

    def __init__(self) -> None:
        self.size: list[int] = []
        self.srcs: list[tuple[int, ...]] = []
        self.inplace: list[bool] = []
        self.view_of: list[int | None] = []  # the root tensor a view looks into (EXTERNAL: not in this buffer)
        self.is_input: list[bool] = []
        self.is_output: list[bool] = []

    def _add(self, size: int, srcs: tuple[int, ...], *, inplace: bool = False, view_of: int | None = None,
             is_input: bool = False, is_output: bool = False) -> int:
        self.size.append(size)
        self.srcs.append(srcs)
        self.inplace.append(inplace)
        self.view_of.append(view_of)
        self.is_input.append(is_input)
        self.is_output.append(is_output)
        return len(self.size) - 1

    def input(self, size: int) -> int:
        return self._add(size, (), is_input=True)

    def op(self, size: int, *srcs: int, inplace: bool = False, output: bool = False) -> int:
        """A node that writes ``size`` bytes; ``inplace`` when ggml_op_can_inplace(its op)."""
        return self._add(size, srcs, inplace=inplace, is_output=output)

    def view(self, src: int) -> int:
        root = self.view_of[src]
        return self._add(0, (src,), view_of=src if root is None else root)

    def store(self, *srcs: int) -> None:
        """A node whose result is a view of the KV cache (``ggml_set_rows``): it only consumes its sources."""
        self._add(0, srcs, view_of=EXTERNAL)


class _Allocator:
    """ggml_dyn_tallocr: free blocks sorted by offset, the last one open-ended."""

    def __init__(self, alignment: int) -> None:
        self.alignment = alignment
        self.blocks: list[list[int]] = [[0, 1 << 62]]  # [offset, size]
        self.max_size = 0

    def _align(self, n: int) -> int:
        return -(-n // self.alignment) * self.alignment

    def alloc(self, size: int) -> int:
        size = self._align(size)
        best, best_size = -1, None
        for i, (_off, bsize) in enumerate(self.blocks[:-1]):
            if bsize >= size and (best_size is None or bsize <= best_size):
                best, best_size = i, bsize
        if best < 0:
            best = len(self.blocks) - 1
        block = self.blocks[best]
        addr = block[0]
        block[0] += size
        block[1] -= size
        if block[1] == 0:
            del self.blocks[best]
        self.max_size = max(self.max_size, addr + size)
        return addr

    def free(self, addr: int, size: int) -> None:
        size = self._align(size)
        blocks = self.blocks
        for i, block in enumerate(blocks):
            if block[0] + block[1] == addr:  # ends where the freed range starts
                block[1] += size
                if i + 1 < len(blocks) and block[0] + block[1] == blocks[i + 1][0]:
                    block[1] += blocks[i + 1][1]
                    del blocks[i + 1]
                return
            if addr + size == block[0]:  # starts where the freed range ends
                block[0] = addr
                block[1] += size
                if i > 0 and blocks[i - 1][0] + blocks[i - 1][1] == block[0]:
                    blocks[i - 1][1] += block[1]
                    del blocks[i]
                return
        at = next((i for i, b in enumerate(blocks) if b[0] > addr), len(blocks))
        blocks.insert(at, [addr, size])


def allocate(g: Graph, alignment: int = CPU_ALIGNMENT) -> int:
    """Bytes ggml's graph allocator reserves for ``g``: the high-water mark of its buffer."""
    n = len(g.size)
    children, views = [0] * n, [0] * n
    for i in range(n):
        root = g.view_of[i]
        if root is not None and root != EXTERNAL:
            views[root] += 1
        for s in g.srcs[i]:
            children[s] += 1
    al = _Allocator(alignment)
    addr: list[int] = [0] * n
    held = [False] * n

    def place(i: int) -> None:
        if held[i] or g.view_of[i] is not None:
            return
        if g.inplace[i]:
            for p in g.srcs[i]:
                if (held[p] and g.view_of[p] is None and not g.is_output[p] and g.size[p] == g.size[i]
                        and children[p] == 1 and views[p] == 0):
                    addr[i], held[i], held[p] = addr[p], True, False
                    return
        addr[i], held[i] = al.alloc(g.size[i]), True

    for i in range(n):
        if g.is_input[i]:
            place(i)
    for i in range(n):
        place(i)
        for p in g.srcs[i]:
            children[p] -= 1
            if children[p] or views[p]:
                continue
            root = g.view_of[p]
            if root is None:
                if held[p] and not g.is_output[p]:
                    al.free(addr[p], g.size[p])
                    held[p] = False
            elif root != EXTERNAL:
                views[root] -= 1
                if views[root] == 0 and children[root] == 0 and held[root] and not g.is_output[root]:
                    al.free(addr[root], g.size[root])
                    held[root] = False
    return al.max_size


# ---- the graphs llama.cpp builds -------------------------------------------------------------------------------

# Projection order per architecture: the order in which the model's code expands Q, K and V into the graph
# (llama.cpp's build_attn expands q, then v, then k for most; gemma2/3 and openai-moe build q, k, v in turn).
# phi3 has one fused wqkv (phi3.cpp, build_qkv) whose Q/K/V are views.
QKV_ORDER = {"gemma2": "qkv", "gemma3": "qkv", "gpt-oss": "qkv", "phi3": "fused", "deepseek2": "mla"}
# Router: softmax over the experts (qwen3moe, deepseek2 v2), sigmoid (glm4moe), or the top-k logits softmaxed
# after selection (gpt-oss, LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX_WEIGHT); qwen3moe renormalises the weights.
ROUTER_WEIGHTS_SOFTMAX = frozenset({"gpt-oss"})
ROUTER_NORM = frozenset({"qwen3moe"})
# Models whose last layer computes every token, the output rows being picked after it from a hidden state that is
# itself a graph output (openai-moe.cpp: ``res->t_h_nextn``; llama-graph.cpp sets it as an output).
LATE_OUTPUT_ROWS = frozenset({"gpt-oss"})


@dataclass(frozen=True)
class Dims:
    """What the graph's sizes depend on, for one device's share of the heads and FFN rows."""

    arch: str
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    head_dim_v: int
    n_ff: int
    n_vocab: int
    # per layer: (experts used, sliding window?, has KV cache); not part of the identity (graph_bytes keys its cache
    # on the kinds of layer it replays, so every stage of a uniform model shares one entry)
    layers: tuple[tuple[int, bool, bool], ...] = field(compare=False, hash=False)
    n_expert: int = 0
    n_ff_exp: int = 0
    n_ff_shared: int = 0
    probs_bias: bool = False
    q_lora: int = 0
    kv_lora: int = 0
    rope_dim: int = 0


def dims_for(spec: ModelSpec, share: float = 1.0) -> Dims:
    """The dimensions of ``spec`` that size its graph, for a device with ``share`` of every split matrix."""

    def part(n: int) -> int:
        return max(1, math.ceil(n * share)) if n else 0

    names = {t.name for t in spec.tensors if t.layer is not None and t.layer < spec.n_layers}
    shapes = {t.name: t.shape for t in spec.tensors}
    layers = tuple((spec.layer_expert_used[i] if i < len(spec.layer_expert_used) else 0,
                    bool(spec.kv_layers[i].sliding and spec.sliding_window), spec.kv_layers[i].n_head_kv > 0)
                   for i in range(spec.n_layers))

    def shape(suffix: str) -> tuple[int, ...] | None:
        return next((s for n, s in shapes.items() if n.startswith("blk.") and n.endswith(suffix)), None)

    shexp, q_a = shape(".ffn_up_shexp.weight"), shape(".attn_q_a.weight")
    head_dim, head_dim_v = spec.head_dim, spec.head_dim_v
    mla = spec.kv_lora_rank > 0
    if mla:  # the per-head query/key and value widths of the decompressed heads, from wq(_b) and wo
        q, wo = shape(".attn_q_b.weight") or shape(".attn_q.weight"), shape(".attn_output.weight")
        head_dim = q[0] // spec.n_head if q else head_dim
        head_dim_v = wo[-1] // spec.n_head if wo else head_dim_v
    return Dims(arch=spec.arch, n_embd=spec.n_embd, n_head=part(spec.n_head), n_head_kv=part(spec.n_head_kv),
                head_dim=head_dim, head_dim_v=head_dim_v, n_ff=part(spec.n_ff), n_vocab=spec.n_vocab,
                layers=layers, n_expert=spec.n_expert, n_ff_exp=part(spec.n_ff_exp),
                n_ff_shared=part(shexp[0]) if shexp else 0,
                probs_bias=any(n.endswith("exp_probs_b.bias") for n in names),
                q_lora=q_a[0] if q_a else 0, kv_lora=spec.kv_lora_rank if mla else 0,
                rope_dim=spec.rope.dim if mla else 0)


def _attention(g: Graph, d: Dims, an: int, T: int, cells: int, fa: bool, inputs: dict[str, int], pos: int) -> int:
    """Q/K/V, the KV-cache stores and attention for one layer; returns the attention output (before ``wo``).

    With a quantized cache llama.cpp rotates K and Q (and V, undoing it on the output) by a Hadamard matrix before
    storing, each a product into a new tensor (``inputs`` then has ``k_rot``/``v_rot``; llama-kv-cache.cpp
    ``attn_rot_k``/``attn_rot_v``)."""
    n_q, n_kv, n_v = d.n_head * d.head_dim, d.n_head_kv * d.head_dim, d.n_head_kv * d.head_dim_v
    n_out = d.n_head * d.head_dim_v
    order = QKV_ORDER.get(d.arch, "qvk")
    k_rot, v_rot = inputs.get("k_rot"), inputs.get("v_rot")

    def rope_of(mm: int, n: int) -> int:
        r = g.op(n * T * F32, g.view(mm), pos, inplace=True)  # a rope of a (reshape) view: a new tensor
        return r if k_rot is None else g.op(n * T * F32, g.view(r), k_rot)

    def value(mm: int) -> int:
        return g.view(mm) if v_rot is None else g.op(n_v * T * F32, g.view(g.view(mm)), v_rot)

    if order == "fused":  # phi3: one wqkv product, Q/K/V views of it
        qkv = g.op((n_q + n_kv + n_v) * T * F32, an)
        q, k = rope_of(qkv, n_q), rope_of(qkv, n_kv)
        g.store(g.view(k), inputs["k_idxs"])
        g.store(g.op(n_v * T * F32, g.view(qkv)), inputs["v_idxs"])  # the strided V view is made contiguous
    else:
        projections: dict[str, int] = {}
        for which in order:
            if which == "q":
                projections["q"] = rope_of(g.op(n_q * T * F32, an), n_q)
            elif which == "k":
                projections["k"] = rope_of(g.op(n_kv * T * F32, an), n_kv)
            else:
                projections["v"] = value(g.op(n_v * T * F32, an))
        q = projections["q"]
        g.store(g.view(projections["k"]), inputs["k_idxs"])
        g.store(g.view(projections["v"]), inputs["v_idxs"])
    qp = g.view(g.view(q))
    if fa:
        out = g.view(g.op(n_out * T * F32, qp, inputs["mask"]))
    else:
        kq = g.op(cells * T * d.n_head * F32, qp)
        kq = g.op(cells * T * d.n_head * F32, kq, inputs["mask"], inplace=True)  # soft_max
        out = g.op(n_out * T * F32, g.view(g.op(n_out * T * F32, kq)))  # cont of the permuted heads
    return out if v_rot is None else g.view(g.op(n_out * T * F32, g.view(out), v_rot))  # rotated back


def _attention_mla(g: Graph, d: Dims, an: int, T: int, cells: int, fa: bool, inputs: dict[str, int],
                   pos: int) -> int:
    """DeepSeek's multi-head latent attention as llama.cpp runs it (deepseek2.cpp, absorbed ``wk_b``/``wv_b``)."""
    rope, lora, v_dim = d.rope_dim, d.kv_lora, d.head_dim_v
    nope = d.head_dim - rope
    if d.q_lora:
        qa = g.op(d.q_lora * T * F32, an)
        qa = g.op(d.q_lora * T * F32, qa, inplace=True)  # rms_norm
        qa = g.op(d.q_lora * T * F32, qa, inplace=True)  # * q_a_norm
        q = g.op(d.n_head * (nope + rope) * T * F32, qa)
    else:
        q = g.op(d.n_head * (nope + rope) * T * F32, an)
    qv = g.view(q)
    q_abs = g.op(d.n_head * lora * T * F32, g.view(g.view(qv)))  # q_nope x wk_b
    q_pe = g.op(d.n_head * rope * T * F32, g.view(qv), pos, inplace=True)
    qcur = g.op(d.n_head * (lora + rope) * T * F32, g.view(q_abs), q_pe)  # concat
    kv = g.op((lora + rope) * T * F32, an)
    kv_n = g.op(lora * T * F32, g.view(kv), inplace=True)  # rms_norm of a view: new
    kv_n = g.op(lora * T * F32, kv_n, inplace=True)
    k_pe = g.op(rope * T * F32, g.view(kv), pos, inplace=True)
    kcur = g.op((lora + rope) * T * F32, g.view(kv_n), k_pe)  # concat
    g.store(g.view(kcur), inputs["k_idxs"])
    v_cont = -1 if fa else g.op(cells * lora * 2)  # a contiguous copy of the cached f16 latent, transposed
    qp = g.view(g.view(qcur))
    if fa:
        out = g.op(d.n_head * lora * T * F32, qp, inputs["mask"])
        mla = g.op(d.n_head * v_dim * T * F32, g.view(out))
    else:
        kq = g.op(cells * T * d.n_head * F32, qp)
        kq = g.op(cells * T * d.n_head * F32, kq, inputs["mask"], inplace=True)
        kqv = g.op(d.n_head * lora * T * F32, v_cont, kq)
        mla = g.op(d.n_head * v_dim * T * F32, kqv)
    return g.op(d.n_head * v_dim * T * F32, g.view(mla))  # cont


def _ffn(g: Graph, d: Dims, x: int, T: int, n_ff: int) -> int:
    gate = g.op(n_ff * T * F32, x)
    up = g.op(n_ff * T * F32, x)
    act = g.op(n_ff * T * F32, gate, up)  # swiglu/geglu: not in place
    return g.op(d.n_embd * T * F32, act)


def _moe(g: Graph, d: Dims, x: int, T: int, used: int) -> int:
    """llama-graph.cpp build_moe_ffn: router, top-k, the selected experts' gate/up/down, their weighted sum."""
    E, ffe, emb = d.n_expert, d.n_ff_exp, d.n_embd
    probs = g.op(E * T * F32, g.op(E * T * F32, x), inplace=True)  # logits, then soft_max/sigmoid/bias in place
    probs_r = g.view(probs)
    select = g.op(E * T * F32, probs, inplace=True) if d.probs_bias else probs  # + exp_probs_b: probs has a view
    topk = g.view(g.op(E * T * F32, select))  # argsort, first `used`
    weights = g.op(used * T * F32, probs_r, topk)  # get_rows
    if d.arch in ROUTER_WEIGHTS_SOFTMAX:
        weights = g.view(g.op(used * T * F32, g.view(weights), inplace=True))
    elif d.arch in ROUTER_NORM:
        wr = g.view(weights)
        total = g.op(T * F32, g.op(T * F32, wr), inplace=True)  # sum_rows, clamp
        weights = g.view(g.op(used * T * F32, wr, total, inplace=True))
    xr = g.view(x)
    gate = g.op(used * ffe * T * F32, xr, topk)
    up = g.op(used * ffe * T * F32, xr, topk)
    down = g.op(used * emb * T * F32, g.op(used * ffe * T * F32, gate, up), topk)
    weighted = g.op(used * emb * T * F32, down, weights, inplace=True)
    parts = [g.view(weighted) for _ in range(used)]
    out = g.op(emb * T * F32, parts[0], parts[1]) if used > 1 else g.op(emb * T * F32, parts[0])
    for p in parts[2:]:
        out = g.op(emb * T * F32, out, p, inplace=True)
    if d.n_ff_shared:
        out = g.op(emb * T * F32, out, _ffn(g, d, x, T, d.n_ff_shared), inplace=True)
    return out


def build(d: Dims, *, ubatch: int, cells: int, swa_cells: int, flash_attn: bool,
          kinds: Sequence[tuple[int, bool, bool]], first: bool, last: bool, quantized_kv: bool = False) -> Graph:
    """The compute-buffer graph of one device running layers of these ``kinds`` (``Dims.layers``) for one ubatch;
    ``quantized_kv``: the cache's K and V are of a quantized type (q8_0, q4_0)."""
    g, T, emb = Graph(), ubatch, d.n_embd
    mla = d.kv_lora > 0
    kinds = [k for k in kinds if k[2]]  # llama.cpp does not run NextN/MTP layers (they have no KV cache)
    if first:
        tokens = g.input(T * 4)
        g.input(emb * T * F32)  # inp_embd: allocated with the inputs, unused when tokens are given
    pos = g.input(T * 4)
    rot_sizes: dict[str, int] = {}  # Hadamard rotations for a quantized cache, when the head width allows
    if quantized_kv and not mla:
        for name, width in (("k_rot", d.head_dim), ("v_rot", d.head_dim_v)):
            if width % 64 == 0:
                n = 64
                while width % (n * 2) == 0:
                    n *= 2
                rot_sizes[name] = n * n * F32
    kv_inputs = {}
    sliding = dict.fromkeys(swa for _used, swa, _kv in kinds)  # in order of first use, as the graph's leafs are
    for swa in sliding:  # llama_kv_cache_iswa: one set of cache inputs (rotations included) per cache
        n = swa_cells if swa else cells
        rot = {name: g.input(size) for name, size in rot_sizes.items()}
        kv_inputs[swa] = {
            "k_idxs": g.input(T * 8),
            "v_idxs": -1 if mla else g.input(T * 8 if flash_attn else T * 8 * d.n_head_kv * d.head_dim_v),
            "mask": g.input(n * T * (2 if flash_attn else F32)),
            **rot,
        }
    out_ids = g.input(T * 4) if last else -1
    x = g.op(emb * T * F32, tokens) if first else g.input(emb * T * F32)  # get_rows, or the previous stage's
    for n, (used, swa, _has_kv) in enumerate(kinds):
        n_cells = swa_cells if swa else cells
        an = g.op(emb * T * F32, g.op(emb * T * F32, x, inplace=True), inplace=True)  # rms_norm, * attn_norm
        attend = _attention_mla if mla else _attention
        att = attend(g, d, an, T, n_cells, flash_attn, kv_inputs[swa], pos)
        wo = g.op(emb * T * F32, att)
        if last and n == len(kinds) - 1 and d.arch not in LATE_OUTPUT_ROWS:  # only the rows that are output
            wo, x = g.op(emb * T * F32, wo, out_ids), g.op(emb * T * F32, x, out_ids)
        ffn_inp = g.op(emb * T * F32, wo, x, inplace=True)
        fn = g.op(emb * T * F32, g.op(emb * T * F32, ffn_inp, inplace=True), inplace=True)
        ffn_out = _moe(g, d, fn, T, used) if used else _ffn(g, d, fn, T, d.n_ff)
        x = g.op(emb * T * F32, ffn_out, ffn_inp, inplace=True)
    if last:
        if d.arch in LATE_OUTPUT_ROWS:  # the last hidden state is an output too (t_h_nextn), then the rows are picked
            g.is_output[x] = True
            x = g.op(emb * T * F32, x, out_ids)
        norm = g.op(emb * T * F32, g.op(emb * T * F32, x, inplace=True), inplace=True, output=True)
        g.op(d.n_vocab * T * F32, norm, output=True)
    return g


def graph_bytes(d: Dims, *, ubatch: int, cells: int, swa_cells: int, flash_attn: bool, start: int, n_layers: int,
                first: bool, last: bool, quantized_kv: bool = False, alignment: int = CPU_ALIGNMENT) -> int:
    """The compute buffer llama.cpp reserves for a device running ``n_layers`` layers from ``start``."""
    # The per-layer graph repeats, and so does the allocation once past the first layers: replay the first four, the
    # first of every other kind of layer in the slice, and the slice's last two.
    end = start + n_layers
    kinds: dict[tuple[int, bool, bool], int] = {}
    for il in range(start, end):
        kinds.setdefault(d.layers[il], il)
    keep = sorted({*range(start, min(end, start + 4)), *kinds.values(), *range(max(start, end - 2), end)})
    return _replay(d, tuple(d.layers[il] for il in keep), ubatch, cells, swa_cells, flash_attn, first, last,
                   quantized_kv, alignment)


@lru_cache(maxsize=4096)
def _replay(d: Dims, kinds: tuple[tuple[int, bool, bool], ...], ubatch: int, cells: int, swa_cells: int,
            flash_attn: bool, first: bool, last: bool, quantized_kv: bool, alignment: int) -> int:
    g = build(d, ubatch=ubatch, cells=cells, swa_cells=swa_cells, flash_attn=flash_attn, kinds=kinds, first=first,
              last=last, quantized_kv=quantized_kv)
    return allocate(g, alignment)
