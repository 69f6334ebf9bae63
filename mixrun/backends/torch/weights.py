"""GGUF tensors -> a (sharded) model's parameters, dequantized with ``gguf.quants`` to the run dtype.

Each rank reads only its own slices from the memory-mapped file: rows of a quantized tensor are whole blocks, so a
row slice is a slice of the bytes; a column slice on block boundaries is one too, and any other column slice is
dequantized a band of rows at a time. A rank's peak memory is its shard plus one band.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, MODEL_TENSOR, TENSOR_NAMES, GGMLQuantizationType
from gguf.quants import dequantize

from mixrun.backends.torch.parallel import Shard
from mixrun.errors import GGUFError, where

BAND_BYTES = 64 << 20  # float32 bytes dequantized at once for an unaligned column slice

# parameter name inside a Block -> the GGUF tensor it comes from
_BLOCK = {
    "attn_norm.weight": (MODEL_TENSOR.ATTN_NORM, "weight"),
    "attn.wq.weight": (MODEL_TENSOR.ATTN_Q, "weight"), "attn.wq.bias": (MODEL_TENSOR.ATTN_Q, "bias"),
    "attn.wk.weight": (MODEL_TENSOR.ATTN_K, "weight"), "attn.wk.bias": (MODEL_TENSOR.ATTN_K, "bias"),
    "attn.wv.weight": (MODEL_TENSOR.ATTN_V, "weight"), "attn.wv.bias": (MODEL_TENSOR.ATTN_V, "bias"),
    "attn.wo.weight": (MODEL_TENSOR.ATTN_OUT, "weight"),
    "attn.q_norm.weight": (MODEL_TENSOR.ATTN_Q_NORM, "weight"),
    "attn.k_norm.weight": (MODEL_TENSOR.ATTN_K_NORM, "weight"),
    "ffn_norm.weight": (MODEL_TENSOR.FFN_NORM, "weight"),
    "ffn.w1.weight": (MODEL_TENSOR.FFN_GATE, "weight"),
    "ffn.w3.weight": (MODEL_TENSOR.FFN_UP, "weight"),
    "ffn.w2.weight": (MODEL_TENSOR.FFN_DOWN, "weight"),
}


def gguf_name(param: str, first_layer: int, tied: bool) -> str:
    """The GGUF tensor behind a parameter of a model part whose first layer is ``first_layer``."""
    if param.startswith("layers."):
        _, idx, rest = param.split(".", 2)
        kind, suffix = _BLOCK[rest]
        return TENSOR_NAMES[kind].format(bid=first_layer + int(idx)) + "." + suffix
    if param == "embed.weight" or (param == "output.weight" and tied):
        return TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD] + ".weight"
    if param == "norm.weight":
        return TENSOR_NAMES[MODEL_TENSOR.OUTPUT_NORM] + ".weight"
    if param == "output.weight":
        return TENSOR_NAMES[MODEL_TENSOR.OUTPUT] + ".weight"
    raise KeyError(param)


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


def load(model: torch.nn.Module, tf: Any, shards: dict[str, Shard], *, first_layer: int, tied: bool,
         dtype: torch.dtype, device: torch.device, progress: Callable[[int, int], None] | None = None) -> int:
    """Materialize a meta-device model on ``device`` and fill every parameter from the GGUF; returns bytes loaded.

    A tensor whose shape does not match what the model expects is a :class:`GGUFError` naming the file."""
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    total = sum(p.numel() * p.element_size() for p in params.values())
    done = 0
    for pname, param in params.items():
        name = gguf_name(pname, first_layer, tied)
        if name not in tf:
            raise GGUFError(where(tf.spec.source, f"tensor {name!r} is missing"))
        arr = read_slice(tf, name, shards.get(pname))
        if tuple(arr.shape) != tuple(param.shape):
            raise GGUFError(where(tf.spec.source, f"tensor {name!r}: shape {list(tf.info(name).shape)} does not give "
                                                  f"the {list(param.shape)} this model part needs"))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a read-only memmap view is only read from
            param.copy_(torch.from_numpy(np.ascontiguousarray(arr)).to(dtype))
        done += param.numel() * param.element_size()
        if progress is not None:
            progress(done, total)
    return done
