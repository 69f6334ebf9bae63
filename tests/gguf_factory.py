"""Write tiny (or sparse, huge-shaped) GGUF files with ``gguf.GGUFWriter`` for the tests.

``write_model`` lays out a Llama-family model's tensors the way llama.cpp names them, with per-architecture
differences (qwen2 QKV bias, qwen3 QK norm and explicit head dim, gemma post-norms, phi3 fused QKV and gate/up).
``sparse=True`` writes a real header and leaves the tensor data as a hole, so a 70B-shaped file costs no disk.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter


def _tensor_bytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * size


def model_tensors(arch: str, *, n_layers: int, n_embd: int, n_head: int, n_head_kv: int, head_dim: int,
                  n_ff: int, n_vocab: int, tied: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(name, row-major shape) of every tensor of a model of this shape."""
    q, kv = n_head * head_dim, n_head_kv * head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (n_vocab, n_embd))]
    for i in range(n_layers):
        b = f"blk.{i}."
        out.append((b + "attn_norm.weight", (n_embd,)))
        if arch == "phi3":
            out.append((b + "attn_qkv.weight", (q + 2 * kv, n_embd)))
        else:
            out += [(b + "attn_q.weight", (q, n_embd)), (b + "attn_k.weight", (kv, n_embd)),
                    (b + "attn_v.weight", (kv, n_embd))]
        if arch == "qwen2":
            out += [(b + "attn_q.bias", (q,)), (b + "attn_k.bias", (kv,)), (b + "attn_v.bias", (kv,))]
        if arch in ("qwen3", "gemma3"):
            out += [(b + "attn_q_norm.weight", (head_dim,)), (b + "attn_k_norm.weight", (head_dim,))]
        out.append((b + "attn_output.weight", (n_embd, q)))
        if arch in ("gemma2", "gemma3"):
            out += [(b + "post_attention_norm.weight", (n_embd,)), (b + "post_ffw_norm.weight", (n_embd,))]
        out.append((b + "ffn_norm.weight", (n_embd,)))
        if arch == "phi3":
            out.append((b + "ffn_up.weight", (2 * n_ff, n_embd)))
        else:
            out += [(b + "ffn_gate.weight", (n_ff, n_embd)), (b + "ffn_up.weight", (n_ff, n_embd))]
        out.append((b + "ffn_down.weight", (n_embd, n_ff)))
    out.append(("output_norm.weight", (n_embd,)))
    if not tied:
        out.append(("output.weight", (n_vocab, n_embd)))
    return out


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's Q4_K_M rule for which layers' attn_v/ffn_down get Q6_K."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], qtype: str, n_layers: int) -> GGMLQuantizationType:
    """The GGML type of one tensor under ``qtype``; ``Q4_K_M`` follows llama.cpp's mix."""
    if len(shape) < 2 or name.endswith("norm.weight"):
        return GGMLQuantizationType.F32
    if qtype != "Q4_K_M":
        return GGMLQuantizationType[qtype]
    if name == "output.weight":
        return GGMLQuantizationType.Q6_K
    if name.endswith(("attn_v.weight", "ffn_down.weight")) and _use_more_bits(int(name.split(".")[1]), n_layers):
        return GGMLQuantizationType.Q6_K
    return GGMLQuantizationType.Q4_K


# byte offsets of the fp16 scale fields in a block: random bytes there would be NaN/inf or absurd scales
SCALE_OFFSETS = {
    GGMLQuantizationType.Q4_0: (0,), GGMLQuantizationType.Q4_1: (0, 2), GGMLQuantizationType.Q5_0: (0,),
    GGMLQuantizationType.Q5_1: (0, 2), GGMLQuantizationType.Q8_0: (0,), GGMLQuantizationType.Q2_K: (80, 82),
    GGMLQuantizationType.Q3_K: (108,), GGMLQuantizationType.Q4_K: (0, 2), GGMLQuantizationType.Q5_K: (0, 2),
    GGMLQuantizationType.Q6_K: (208,),
}


def random_blocks(qtype: GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator,
                  scale: float = 0.05) -> np.ndarray:
    """Random blocks (rows, bytes per row) of ``qtype``, so every code and sub-scale value occurs; only the fp16
    fields get finite values, uniform in [-scale, scale]. For the types gguf-py cannot quantize to (K-quants)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block_size, type_size), dtype=np.uint8)
    for off in SCALE_OFFSETS[qtype]:
        d = rng.uniform(-scale, scale, size=(rows, cols // block_size, 1)).astype(np.float16)
        raw[..., off:off + 2] = d.view(np.uint8)
    return raw.reshape(rows, -1)


def write_model(path: str | os.PathLike[str], arch: str = "llama", *, n_layers: int = 2, n_embd: int = 64,
                n_head: int = 4, n_head_kv: int = 2, head_dim: int | None = None, n_ff: int = 128, n_vocab: int = 64,
                n_ctx: int = 2048, tied: bool = True, qtype: str = "F32", sparse: bool = False,
                sliding_window: int | None = None, extra_kv: dict[str, Any] | None = None,
                split_max_tensors: int = 0, seed: int = 0, merges: bool = False,
                chat_template: str | None = None) -> Path:
    """Write a model; returns the path (the first part's when split). ``qtype`` is a GGML type name or
    ``Q4_K_M`` (llama.cpp's mix of Q4_K and Q6_K). ``merges`` makes the file loadable by llama.cpp.
    ``chat_template`` replaces the default one (which prints the messages' contents)."""
    head_dim = head_dim or n_embd // n_head
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(n_layers)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    if head_dim != n_embd // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    if sliding_window:
        w.add_sliding_window(sliding_window)
    w.add_tokenizer_model("gpt2")
    tokens = [f"t{i}" for i in range(n_vocab)]
    w.add_token_list(tokens)
    w.add_token_types([1] * n_vocab)
    if merges:  # llama.cpp refuses a "gpt2" vocabulary without merges; one is enough to load
        w.add_token_merges(["t 0"])
    w.add_chat_template(chat_template if chat_template is not None else
                        "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for k, v in (extra_kv or {}).items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, v)
    rng = np.random.default_rng(seed)
    shapes = model_tensors(arch, n_layers=n_layers, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
                           head_dim=head_dim, n_ff=n_ff, n_vocab=n_vocab, tied=tied)
    for name, shape in shapes:
        t = tensor_type(name, shape, qtype, n_layers)
        if sparse:
            # Only the header matters: declare the tensor's type and shape and write no data (see below).
            if t == GGMLQuantizationType.F32:
                w.add_tensor_info(name, shape, np.dtype(np.float32), _tensor_bytes(shape, t))
            else:
                byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, t)
                w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), _tensor_bytes(shape, t), raw_dtype=t)
            continue
        if t in SCALE_OFFSETS and t.name.endswith("_K"):  # gguf-py quantizes to the legacy types only
            w.add_tensor(name, random_blocks(t, shape[0], shape[1], rng, scale=1e-3), raw_dtype=t)
            continue
        data = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if name.endswith("norm.weight"):
            data = 1.0 + data
        if t == GGMLQuantizationType.F32:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, gguf.quants.quantize(data, t), raw_dtype=t)
    if sparse:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        total = sum(_tensor_bytes(s, tensor_type(n, s, qtype, n_layers)) for n, s in shapes)
        fout = w.fout[0]
        data_start = fout.tell()
        w.close()
        with open(path, "r+b") as f:
            f.truncate(data_start + total + 32 * len(shapes))  # a hole: no disk used, reads as zeros
        return Path(path)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if split_max_tensors:
        p = Path(path)
        return p.with_name(f"{p.stem}-00001-of-{_count_parts(p):05d}.gguf")
    return Path(path)


def _count_parts(p: Path) -> int:
    return len(list(p.parent.glob(f"{p.stem}-*-of-*.gguf")))


LLAMA3_70B = dict(n_layers=80, n_embd=8192, n_head=64, n_head_kv=8, n_ff=28672, n_vocab=128256, n_ctx=131072,
                  tied=False)


def header_size(path: str | os.PathLike[str]) -> int:
    """Offset where tensor data starts (the end of the padded header)."""
    return int(gguf.GGUFReader(str(path)).data_offset)


def dequantized_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy a GGUF with every tensor dequantized to F32 (metadata kept, ``general.file_type`` set to F32), so
    llama.cpp and mixrun's torch backend run exactly the same weights."""
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    w = GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub_type=sub)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, data.reshape(tuple(int(d) for d in reversed(t.shape.tolist()))))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(dst)


def raw_gguf(path: str | os.PathLike[str], *, kv: list[tuple[str, int, bytes]] | None = None,
             tensors: list[tuple[str, tuple[int, ...], int, int]] | None = None, n_kv: int | None = None,
             n_tensors: int | None = None, size: int | None = None, version: int = 3) -> Path:
    """Write a GGUF byte by byte, for hostile headers GGUFWriter will not write (or writes too slowly).

    ``kv`` holds (key, GGUF value type, encoded value bytes); ``tensors`` holds (name, ne0-first dims, GGML type,
    data offset). ``n_kv``/``n_tensors`` override the counts in the preamble; ``size`` extends the file with a hole
    (a sparse file: no disk used, reads as zeros)."""
    kv, tensors = kv or [], tensors or []
    out = bytearray(struct.pack("<IIQQ", gguf.GGUF_MAGIC, version,
                                len(tensors) if n_tensors is None else n_tensors, len(kv) if n_kv is None else n_kv))
    for key, vtype, value in kv:
        k = key.encode()
        out += struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype) + value
    for name, dims, qtype, offset in tensors:
        n = name.encode()
        out += struct.pack(f"<Q{len(n)}sI{len(dims)}QIQ", len(n), n, len(dims), *dims, qtype, offset)
    with open(path, "wb") as f:
        f.write(out)
        if size is not None and size > len(out):
            f.truncate(size)
    return Path(path)


def kv_str(text: str | bytes) -> bytes:
    """A GGUF string value (u64 length, bytes)."""
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def kv_u32(value: int) -> bytes:
    return struct.pack("<I", value)


def kv_array(item_type: int, count: int, items: bytes = b"") -> bytes:
    """A GGUF array value header (item type, count) followed by ``items`` (the caller's encoded elements)."""
    return struct.pack("<IQ", item_type, count) + items
