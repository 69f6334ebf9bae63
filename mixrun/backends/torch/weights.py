"""GGUF tensors -> a (sharded) model's parameters: dequantized with ``gguf.quants`` to the run dtype, or, on GPU
ranks, quantized matrices kept as their raw GGUF blocks (expanded before each product by :mod:`quant`).

Each rank reads only its own slices from the memory-mapped file: rows of a quantized tensor are whole blocks, so a
row slice is a slice of the bytes; a column slice on block boundaries is one too, and any other column slice is
dequantized a band of rows at a time. A rank's peak memory is its shard plus one band. Parameters with several
GGUF tensors (fused Q/K/V, gate/up) are filled part by part, by rows; NEOX models' Q/K rows are reordered into the
RoPE pair order on the way. On the CPU all parameters live in one huge-page-advised map (:func:`materialize`).
"""

from __future__ import annotations

import contextlib
import mmap
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, MODEL_TENSOR, TENSOR_NAMES, GGMLQuantizationType
from gguf.quants import dequantize

from mixrun.backends.torch import quant
from mixrun.backends.torch.parallel import Shard
from mixrun.errors import GGUFError, MixrunError, where

BAND_BYTES = 64 << 20  # float32 bytes dequantized at once for an unaligned column slice

# parameter name inside a Block -> the GGUF tensors it holds, stacked by rows (Q/K/V and gate/up are fused)
_BLOCK: dict[str, tuple[tuple[MODEL_TENSOR, str], ...]] = {
    "attn_norm.weight": ((MODEL_TENSOR.ATTN_NORM, "weight"),),
    "attn.wqkv.weight": ((MODEL_TENSOR.ATTN_Q, "weight"), (MODEL_TENSOR.ATTN_K, "weight"),
                         (MODEL_TENSOR.ATTN_V, "weight")),
    "attn.wqkv.bias": ((MODEL_TENSOR.ATTN_Q, "bias"), (MODEL_TENSOR.ATTN_K, "bias"), (MODEL_TENSOR.ATTN_V, "bias")),
    "attn.wo.weight": ((MODEL_TENSOR.ATTN_OUT, "weight"),),
    "attn.wo.bias": ((MODEL_TENSOR.ATTN_OUT, "bias"),),
    "attn.sinks": ((MODEL_TENSOR.ATTN_SINKS, "weight"),),
    "attn.q_norm.weight": ((MODEL_TENSOR.ATTN_Q_NORM, "weight"),),
    "attn.k_norm.weight": ((MODEL_TENSOR.ATTN_K_NORM, "weight"),),
    "ffn_norm.weight": ((MODEL_TENSOR.FFN_NORM, "weight"),),
    "ffn.w13.weight": ((MODEL_TENSOR.FFN_GATE, "weight"), (MODEL_TENSOR.FFN_UP, "weight")),
    "ffn.w2.weight": ((MODEL_TENSOR.FFN_DOWN, "weight"),),
    # mixture of experts (.moe): the router, and the experts' matrices stacked by rows as the GGUF stacks them
    "ffn.router.weight": ((MODEL_TENSOR.FFN_GATE_INP, "weight"),),
    "ffn.router.bias": ((MODEL_TENSOR.FFN_GATE_INP, "bias"),),
    "ffn.gate_exps.bias": ((MODEL_TENSOR.FFN_GATE_EXP, "bias"),),
    "ffn.up_exps.bias": ((MODEL_TENSOR.FFN_UP_EXP, "bias"),),
    "ffn.down_exps.bias": ((MODEL_TENSOR.FFN_DOWN_EXP, "bias"),),
    "ffn.gate_exps.weight": ((MODEL_TENSOR.FFN_GATE_EXP, "weight"),),
    "ffn.up_exps.weight": ((MODEL_TENSOR.FFN_UP_EXP, "weight"),),
    "ffn.down_exps.weight": ((MODEL_TENSOR.FFN_DOWN_EXP, "weight"),),
    "ffn.probs_bias": ((MODEL_TENSOR.FFN_EXP_PROBS_B, "bias"),),
    "ffn.shared.w13.weight": ((MODEL_TENSOR.FFN_GATE_SHEXP, "weight"), (MODEL_TENSOR.FFN_UP_SHEXP, "weight")),
    "ffn.shared.w2.weight": ((MODEL_TENSOR.FFN_DOWN_SHEXP, "weight"),),
}
# where a model names a tensor otherwise: glm4moe norms before the FFN with post_attention_norm
_ELSE = {MODEL_TENSOR.FFN_NORM: MODEL_TENSOR.ATTN_POST_NORM}
# tensors whose features within a head follow the RoPE pair order (reordered for NEOX models)
_ROTATED = (MODEL_TENSOR.ATTN_Q, MODEL_TENSOR.ATTN_K, MODEL_TENSOR.ATTN_Q_NORM, MODEL_TENSOR.ATTN_K_NORM)


def gguf_parts(param: str, first_layer: int, tied: bool, present: Callable[[str], bool] = lambda _name: True
               ) -> list[tuple[str, bool]]:
    """The GGUF tensors behind a parameter of a model part whose first layer is ``first_layer``, in row order,
    each with whether its head features are rotated by RoPE; ``present`` says whether the file has a tensor (the
    other name of :data:`_ELSE` is taken when it has not)."""
    if param.startswith("layers."):
        _, idx, rest = param.split(".", 2)

        def name(kind: MODEL_TENSOR, suffix: str) -> str:
            return TENSOR_NAMES[kind].format(bid=first_layer + int(idx)) + "." + suffix

        return [(name(kind, suffix) if kind not in _ELSE or present(name(kind, suffix)) else
                 name(_ELSE[kind], suffix), kind in _ROTATED) for kind, suffix in _BLOCK[rest]]
    if param == "embed.weight" or (param == "output.weight" and tied):
        return [(TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD] + ".weight", False)]
    if param == "norm.weight":
        return [(TENSOR_NAMES[MODEL_TENSOR.OUTPUT_NORM] + ".weight", False)]
    if param == "output.weight":
        return [(TENSOR_NAMES[MODEL_TENSOR.OUTPUT] + ".weight", False)]
    raise KeyError(param)


def reorder_heads(arr: np.ndarray, order: list[int]) -> np.ndarray:
    """Reorder the features of every head (rows of a weight, elements of a bias or QK-norm weight)."""
    hd = len(order)
    return arr.reshape(-1, hd, *arr.shape[1:])[:, order].reshape(arr.shape)


def read_slice(tf: Any, name: str, shard: Shard | None) -> np.ndarray:
    """A tensor, or its row/column slice, as float32 in row-major shape."""
    info = tf.info(name)
    qtype = GGMLQuantizationType[info.qtype]
    block, type_size = GGML_QUANT_SIZES[qtype]
    shape = info.shape
    cols = shape[-1]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    raw = tf.raw(name).reshape(rows, cols // block * type_size)  # (rows, bytes per row)
    if shard is None or shard.dim is None:
        return dequantize(raw, qtype).reshape(shape)
    if shard.dim == 0:
        if len(shape) == 1:  # a bias: its "rows" are its elements
            return dequantize(raw, qtype).reshape(-1)[shard.start:shard.stop]
        return dequantize(raw[shard.start:shard.stop], qtype)
    a, b = shard.start, shard.stop
    if a % block == 0 and b % block == 0:
        return dequantize(raw[:, a // block * type_size: b // block * type_size], qtype)
    out = np.empty((rows, b - a), dtype=np.float32)
    band = max(1, BAND_BYTES // (cols * 4))
    for r in range(0, rows, band):
        out[r:r + band] = dequantize(raw[r:r + band], qtype)[:, a:b]
    return out


def materialize(model: torch.nn.Module, device: torch.device) -> mmap.mmap | None:
    """Allocate a meta-device model's parameters on ``device``, uninitialized. On a Linux CPU they share one
    anonymous memory map advised for transparent huge pages: a decode step streams every weight once, and with
    2 MiB pages it takes fewer TLB misses (about 8% more bandwidth here, ``docs/benchmarks.md``). Returns the map,
    which must live as long as the parameters."""
    params = [(n, p) for n, p in model.named_parameters()]
    if device.type != "cpu" or not hasattr(mmap, "MADV_HUGEPAGE") or not params:
        model.to_empty(device=device)
        return None
    align = 64
    spans = [-(-p.numel() * p.element_size() // align) * align for _, p in params]
    try:
        buf = mmap.mmap(-1, sum(spans), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as e:
        raise MixrunError(f"cannot allocate {sum(spans) / 2**30:.2f} GiB for this rank's weights: {e.strerror}") from e
    with contextlib.suppress(OSError):  # transparent huge pages off or unsupported: plain pages
        buf.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    off = 0
    for (name, p), span in zip(params, spans, strict=True):
        t = raw[off:off + p.numel() * p.element_size()].view(p.dtype).view(p.shape)
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, torch.nn.Parameter(t, requires_grad=False))
        off += span
    return buf


def read_blocks(tf: Any, name: str, shard: Shard | None) -> np.ndarray | None:
    """A matrix's (slice of) GGUF blocks as raw bytes (rows, bytes per row), or None for a column slice that
    cuts blocks."""
    info = tf.info(name)
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[info.qtype]]
    rows, cols = int(np.prod(info.shape[:-1])), info.shape[-1]
    raw = tf.raw(name).reshape(rows, cols // block * type_size)
    if shard is None or shard.dim is None:
        return raw
    if shard.dim == 0:
        return raw[shard.start:shard.stop]
    if shard.start % block or shard.stop % block:
        return None
    return raw[:, shard.start // block * type_size: shard.stop // block * type_size]


def _kept_in_blocks(model: torch.nn.Module, tf: Any, shards: dict[str, tuple[Shard, ...]], first_layer: int,
                    tied: bool) -> dict[str, list[tuple[str, bool, Shard | None]]]:
    """Matrices to keep in their GGUF quant blocks: every part quantized in a type :mod:`quant` handles, and
    sliced along whole blocks."""
    out = {}
    for pname, p in model.named_parameters():
        if p.dim() != 2:
            continue
        parts = gguf_parts(pname, first_layer, tied, tf.__contains__)
        pshards = shards.get(pname) or [None] * len(parts)
        keep = []
        for (name, rotated), shard in zip(parts, pshards, strict=True):
            if name not in tf:
                break
            info = tf.info(name)
            qtype = GGMLQuantizationType[info.qtype]
            block = GGML_QUANT_SIZES[qtype][0]
            if qtype not in quant.SUPPORTED or block == 1 or (
                    shard is not None and shard.dim == 1 and (shard.start % block or shard.stop % block)):
                break
            keep.append((name, rotated, shard))
        else:
            out[pname] = keep
    return out


def load(model: torch.nn.Module, tf: Any, shards: dict[str, tuple[Shard, ...]], *, first_layer: int, tied: bool,
         dtype: torch.dtype, device: torch.device, order: list[int] | None = None, blocks: bool = False,
         progress: Callable[[int, int], None] | None = None) -> int:
    """Materialize a meta-device model on ``device`` and fill every parameter from the GGUF; returns bytes held.

    ``shards`` gives each parameter's slice of each of its GGUF tensors (none: whole tensors); ``order`` is the
    RoPE feature order within a head for Q and K (:func:`mixrun.backends.torch.model.pair_order`). With
    ``blocks``, quantized matrices stay in their GGUF blocks on the device (the module gets ``blocks``, a list
    of (uint8 tensor, quant type) in row order, and ``block_cols``; its weight is an empty placeholder) and are
    dequantized one at a time before their product, so a device holds what the planner counted. A tensor whose
    shape does not match what the model expects is a :class:`GGUFError` naming the file."""
    kept = _kept_in_blocks(model, tf, shards, first_layer, tied) if blocks else {}
    for pname in kept:
        owner, _, attr = pname.rpartition(".")
        cols = model.get_parameter(pname).shape[1]
        setattr(model.get_submodule(owner), attr, torch.nn.Parameter(torch.empty(0, cols, device="meta"),
                                                                      requires_grad=False))
    model.weight_map = materialize(model, device)
    params = dict(model.named_parameters())
    dense_total = sum(p.numel() * p.element_size() for p in params.values())
    block_total = sum(read_blocks(tf, n, sh).size for parts in kept.values() for n, _, sh in parts)
    total = dense_total + block_total
    done = 0
    for pname, param in params.items():
        if pname in kept:
            continue
        parts = gguf_parts(pname, first_layer, tied, tf.__contains__)
        row = 0
        for (name, rotated), shard in zip(parts, shards.get(pname) or [None] * len(parts), strict=True):
            if name not in tf:
                raise GGUFError(where(tf.spec.source, f"tensor {name!r} is missing"))
            arr = read_slice(tf, name, shard)
            if param.dim() == 1 and arr.ndim > 1:  # the experts' (n_expert, rows) biases, stacked as one vector
                arr = arr.reshape(-1)
            if rotated and order is not None:
                arr = reorder_heads(arr, order)
            n = arr.shape[0]
            if tuple(arr.shape[1:]) != tuple(param.shape[1:]) or row + n > param.shape[0]:
                raise GGUFError(where(tf.spec.source, f"tensor {name!r}: shape {list(tf.info(name).shape)} does not "
                                                      f"give the {list(param.shape)} this model part needs"))
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # a read-only memmap view is only read from
                param[row:row + n].copy_(torch.from_numpy(np.ascontiguousarray(arr)).to(dtype))
            row += n
        if row != param.shape[0]:
            raise GGUFError(where(tf.spec.source, f"tensors {[n for n, _ in parts]} give {row} rows, this model "
                                                  f"part needs {param.shape[0]}"))
        done += param.numel() * param.element_size()
        if progress is not None:
            progress(done, total)
    for pname, parts in kept.items():
        owner = model.get_submodule(pname.rpartition(".")[0])
        held = []
        for name, rotated, shard in parts:
            raw = read_blocks(tf, name, shard)
            info = tf.info(name)
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[info.qtype]]
            if raw is None or raw.shape[1] != params[pname].shape[1] // block * type_size:
                raise GGUFError(where(tf.spec.source, f"tensor {name!r}: shape {list(info.shape)} does not give "
                                                      f"the {params[pname].shape[1]} columns this model part needs"))
            if rotated and order is not None:
                raw = reorder_heads(raw, order)
            held.append((torch.from_numpy(np.ascontiguousarray(raw)).to(device), GGMLQuantizationType[info.qtype]))
            done += raw.size
        rows = sum(r.shape[0] for r, _ in held)
        want = owner.out_features if isinstance(owner, torch.nn.Linear) else owner.rows
        if rows != want:
            raise GGUFError(where(tf.spec.source, f"tensors {[n for n, _, _ in parts]} give {rows} rows, this "
                                                  f"model part needs {want}"))
        owner.blocks, owner.block_cols, owner.block_dtype = held, params[pname].shape[1], dtype
        if progress is not None:
            progress(done, total)
    return done


def build_part(tf: Any, cfg: Any, stage: Any, member: int, comm: Any, *, head: bool, max_pos: int,
               dtype: torch.dtype, device: torch.device, blocks: bool = False,
               progress: Callable[[int, int], None] | None = None) -> tuple[Any, int]:
    """A rank's model part, ready to run: built on the meta device, shrunk to this member's TP shard, loaded from
    the GGUF and given its caches and its one-token step. Returns the part and the bytes of weights it holds."""
    from mixrun.backends.torch.model import Transformer, pair_order
    from mixrun.backends.torch.parallel import apply_tp
    from mixrun.backends.torch.step import decode_step

    with torch.device("meta"):
        model = Transformer(cfg, stage.layers, head=head, max_pos=max_pos).to(dtype)
    shards = apply_tp(model, stage, member, comm)
    held = load(model, tf, shards, first_layer=stage.layers[0], tied=cfg.tied, dtype=dtype, device=device,
                order=pair_order(cfg), blocks=blocks, progress=progress)
    model.setup_cache(dtype, device)
    # the one-token step (buffered on the CPU, else with the residual adds folded); it calls the layers past
    # apply_tp's all-reduce hooks, so it takes the all-reduce itself
    model.step = decode_step(model, dtype, device, comm.all_reduce if stage.tp > 1 else None)
    return model.eval(), held
