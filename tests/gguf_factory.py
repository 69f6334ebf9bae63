"""Write tiny (or sparse, huge-shaped) GGUF files with ``gguf.GGUFWriter`` for the tests.

``write_model`` lays out a Llama-family model's tensors the way llama.cpp names them, with per-architecture
differences (qwen2 QKV bias, qwen3 QK norm and explicit head dim, gemma post-norms, phi3 fused QKV and gate/up).
``sparse=True`` writes a real header and leaves the tensor data as a hole, so a 70B-shaped file costs no disk.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
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


@dataclass(frozen=True)
class MoEShape:
    """The mixture-of-experts part of a model: counts, one expert's FFN width, the first ``n_dense_lead`` layers
    dense (glm4moe, deepseek2), and MLA's ranks (deepseek2: ``kv_lora_rank`` > 0). ``expert_qtype`` overrides the
    experts' type (gpt-oss: MXFP4)."""

    n_expert: int = 4
    n_expert_used: int = 2
    n_ff_exp: int = 32
    n_expert_shared: int = 0
    n_dense_lead: int = 0
    expert_qtype: str | None = None
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    rope_dim: int = 0  # MLA: the RoPE part of each key (qk_rope_head_dim)
    v_head_dim: int = 0  # MLA: value head width


MOE_ARCHS = ("qwen3moe", "gpt-oss", "glm4moe", "deepseek2")


def moe_tensors(arch: str, moe: MoEShape, *, n_layers: int, n_embd: int, n_head: int, n_head_kv: int,
                head_dim: int, n_ff: int, n_vocab: int, tied: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(name, row-major shape) of every tensor of a MoE model, as llama.cpp's loader asks for them
    (src/models/{qwen3moe,openai-moe,glm4-moe,deepseek2}.cpp load_arch_tensors). Experts are the outermost axis."""
    q, kv, e, f = n_head * head_dim, n_head_kv * head_dim, moe.n_expert, moe.n_ff_exp
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (n_vocab, n_embd))]
    for i in range(n_layers):
        b = f"blk.{i}."
        out.append((b + "attn_norm.weight", (n_embd,)))
        if arch == "deepseek2":  # MLA: q through a low-rank pair, K/V through the cached latent (kv_lora + rope)
            k_mla = head_dim  # nope + rope per head
            if moe.q_lora_rank:
                out += [(b + "attn_q_a_norm.weight", (moe.q_lora_rank,)),
                        (b + "attn_q_a.weight", (moe.q_lora_rank, n_embd)),
                        (b + "attn_q_b.weight", (n_head * k_mla, moe.q_lora_rank))]
            else:  # DeepSeek-V2-Lite: a plain query projection
                out.append((b + "attn_q.weight", (n_head * k_mla, n_embd)))
            out += [(b + "attn_kv_a_norm.weight", (moe.kv_lora_rank,)),
                    (b + "attn_kv_a_mqa.weight", (moe.kv_lora_rank + moe.rope_dim, n_embd)),
                    (b + "attn_k_b.weight", (n_head, moe.kv_lora_rank, k_mla - moe.rope_dim)),
                    (b + "attn_v_b.weight", (n_head, moe.v_head_dim, moe.kv_lora_rank)),
                    (b + "attn_output.weight", (n_embd, n_head * moe.v_head_dim))]
        else:
            out += [(b + "attn_q.weight", (q, n_embd)), (b + "attn_k.weight", (kv, n_embd)),
                    (b + "attn_v.weight", (kv, n_embd))]
            if arch in ("gpt-oss", "glm4moe"):
                out += [(b + "attn_q.bias", (q,)), (b + "attn_k.bias", (kv,)), (b + "attn_v.bias", (kv,))]
            if arch == "qwen3moe":
                out += [(b + "attn_q_norm.weight", (head_dim,)), (b + "attn_k_norm.weight", (head_dim,))]
            out.append((b + "attn_output.weight", (n_embd, q)))
        if arch == "gpt-oss":
            out += [(b + "attn_output.bias", (n_embd,)), (b + "attn_sinks.weight", (n_head,))]
        # gpt-oss and glm4moe norm before the FFN with post_attention_norm, the others with ffn_norm
        out.append((b + ("post_attention_norm.weight" if arch in ("gpt-oss", "glm4moe") else "ffn_norm.weight"),
                    (n_embd,)))
        if i < moe.n_dense_lead:
            out += [(b + "ffn_gate.weight", (n_ff, n_embd)), (b + "ffn_up.weight", (n_ff, n_embd)),
                    (b + "ffn_down.weight", (n_embd, n_ff))]
            continue
        out.append((b + "ffn_gate_inp.weight", (e, n_embd)))
        if arch == "gpt-oss":
            out.append((b + "ffn_gate_inp.bias", (e,)))
        if arch in ("glm4moe", "deepseek2"):
            out.append((b + "exp_probs_b.bias", (e,)))
        out += [(b + "ffn_gate_exps.weight", (e, f, n_embd)), (b + "ffn_up_exps.weight", (e, f, n_embd)),
                (b + "ffn_down_exps.weight", (e, n_embd, f))]
        if arch == "gpt-oss":
            out += [(b + "ffn_gate_exps.bias", (e, f)), (b + "ffn_up_exps.bias", (e, f)),
                    (b + "ffn_down_exps.bias", (e, n_embd))]
        if moe.n_expert_shared:
            s = f * moe.n_expert_shared
            out += [(b + "ffn_gate_shexp.weight", (s, n_embd)), (b + "ffn_up_shexp.weight", (s, n_embd)),
                    (b + "ffn_down_shexp.weight", (n_embd, s))]
    out.append(("output_norm.weight", (n_embd,)))
    if not tied:
        out.append(("output.weight", (n_vocab, n_embd)))
    return out


def _moe_header(w: GGUFWriter, arch: str, moe: MoEShape, head_dim: int) -> None:
    w.add_expert_count(moe.n_expert)
    w.add_expert_used_count(moe.n_expert_used)
    w.add_expert_feed_forward_length(moe.n_ff_exp)
    if arch in ("glm4moe", "deepseek2"):
        w.add_expert_shared_count(moe.n_expert_shared)
        w.add_leading_dense_block_count(moe.n_dense_lead)
    if arch == "deepseek2":  # as convert_hf_to_gguf.py writes MLA: one KV "head" of latent + rope, V inside it
        w.add_q_lora_rank(moe.q_lora_rank)  # 0 without a low-rank query (DeepSeek-V2-Lite); llama.cpp needs the key
        w.add_kv_lora_rank(moe.kv_lora_rank)
        w.add_key_length_mla(head_dim)
        w.add_value_length_mla(moe.v_head_dim)


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's Q4_K_M rule for which layers' attn_v/ffn_down get Q6_K."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], qtype: str, n_layers: int) -> GGMLQuantizationType:
    """The GGML type of one tensor under ``qtype``; ``Q4_K_M`` and ``Q5_K_M`` follow llama.cpp's mixes."""
    if len(shape) < 2 or name.endswith("norm.weight"):
        return GGMLQuantizationType.F32
    if name.endswith((".bias", "ffn_gate_inp.weight")):  # llama.cpp's quantize keeps the router and biases F32
        return GGMLQuantizationType.F32
    if qtype not in ("Q4_K_M", "Q5_K_M"):
        return GGMLQuantizationType[qtype]
    if name == "output.weight":
        return GGMLQuantizationType.Q6_K
    if name.endswith(("attn_v.weight", "ffn_down.weight", "ffn_down_exps.weight")) and \
            _use_more_bits(int(name.split(".")[1]), n_layers):
        return GGMLQuantizationType.Q6_K
    return GGMLQuantizationType.Q4_K if qtype == "Q4_K_M" else GGMLQuantizationType.Q5_K


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


def random_mxfp4(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random MXFP4 blocks (1 E8M0 scale byte + 16 bytes of FP4 codes per 32 values) with scales near 2^-7, so the
    values stay small and finite; shape (..., bytes per row)."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType.MXFP4]
    raw = rng.integers(0, 256, size=(*shape[:-1], shape[-1] // block, size), dtype=np.uint8)
    raw[..., 0] = rng.integers(118, 122, size=raw.shape[:-1], dtype=np.uint8)  # 2^(e - 127)
    return raw.reshape(*shape[:-1], -1)


def write_model(path: str | os.PathLike[str], arch: str = "llama", *, n_layers: int = 2, n_embd: int = 64,
                n_head: int = 4, n_head_kv: int = 2, head_dim: int | None = None, n_ff: int = 128, n_vocab: int = 64,
                n_ctx: int = 2048, tied: bool = True, qtype: str = "F32", sparse: bool = False,
                sliding_window: int | None = None, extra_kv: dict[str, Any] | None = None,
                split_max_tensors: int = 0, seed: int = 0, merges: bool = False,
                chat_template: str | None = None, moe: MoEShape | None = None, name: str | None = None,
                rope_dim: int | None = None) -> Path:
    """Write a model; returns the path (the first part's when split). ``qtype`` is a GGML type name or
    ``Q4_K_M`` (llama.cpp's mix of Q4_K and Q6_K). ``merges`` makes the file loadable by llama.cpp.
    ``chat_template`` replaces the default one (which prints the messages' contents). ``moe`` makes it a mixture
    of experts (``arch`` one of MOE_ARCHS; for deepseek2 ``head_dim`` is the query/key head width, nope + rope).
    ``name`` (general.name, default ``tiny-ARCH``): llama.cpp sets token attributes by it, and for a name with
    "phi3" in it looks up "</s>", which the tiny vocabulary lacks. ``rope_dim``: rotate only that many features of
    each head (GLM's partial rotary embedding; default the whole head)."""
    head_dim = head_dim or n_embd // n_head
    mla = moe is not None and moe.kv_lora_rank > 0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    w.add_name(name or f"tiny-{arch}")
    w.add_block_count(n_layers)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    if mla:  # llama.cpp's MLA cache: one "head" of latent + rope key; V is the latent (convert_hf_to_gguf.py)
        assert moe is not None
        w.add_head_count_kv(1)
        w.add_key_length(moe.kv_lora_rank + moe.rope_dim)
        w.add_value_length(moe.kv_lora_rank)
        w.add_rope_dimension_count(moe.rope_dim)
    else:
        w.add_head_count_kv(n_head_kv)
        if head_dim != n_embd // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_rope_dimension_count(rope_dim or head_dim)
    if moe is not None:
        _moe_header(w, arch, moe, head_dim)
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
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, v)
    rng = np.random.default_rng(seed)
    dims = dict(n_layers=n_layers, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, n_ff=n_ff,
                n_vocab=n_vocab, tied=tied)
    shapes = model_tensors(arch, **dims) if moe is None else moe_tensors(arch, moe, **dims)

    def type_of(name: str, shape: tuple[int, ...]) -> GGMLQuantizationType:
        if moe is not None and moe.expert_qtype and name.endswith("_exps.weight"):
            return GGMLQuantizationType[moe.expert_qtype]
        return tensor_type(name, shape, qtype, n_layers)

    for name, shape in shapes:
        t = type_of(name, shape)
        if sparse:
            # Only the header matters: declare the tensor's type and shape and write no data (see below).
            if t == GGMLQuantizationType.F32:
                w.add_tensor_info(name, shape, np.dtype(np.float32), _tensor_bytes(shape, t))
            else:
                byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, t)
                w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), _tensor_bytes(shape, t), raw_dtype=t)
            continue
        if t in SCALE_OFFSETS and t.name.endswith("_K"):  # gguf-py quantizes to the legacy types only
            blocks = random_blocks(t, int(np.prod(shape[:-1])), shape[-1], rng, scale=1e-3)
            w.add_tensor(name, blocks.reshape(*shape[:-1], -1), raw_dtype=t)
            continue
        if t == GGMLQuantizationType.MXFP4:
            w.add_tensor(name, random_mxfp4(shape, rng), raw_dtype=t)
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
        total = sum(_tensor_bytes(s, type_of(n, s)) for n, s in shapes)
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
    _copy_fields(reader, w, lambda key: key != gguf.Keys.General.FILE_TYPE)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, data.reshape(tuple(int(d) for d in reversed(t.shape.tolist()))))
    return _finish(w, dst)


def with_tokenizer(src: str | os.PathLike[str], donor: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy ``src`` (tensors as they are) with ``donor``'s tokenizer (every ``tokenizer.*`` key but the chat
    template, which stays ``src``'s), so llama.cpp tokenizes real text for a random model. ``src`` must have been
    written with the donor's vocabulary size."""
    reader, vocab = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(donor))
    w = GGUFWriter(str(dst), reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    template = gguf.Keys.Tokenizer.CHAT_TEMPLATE
    _copy_fields(reader, w, lambda key: not key.startswith("tokenizer.") or key == template)
    _copy_fields(vocab, w, lambda key: key.startswith("tokenizer.") and key != template)
    for t in reader.tensors:
        plain = t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        w.add_tensor(t.name, np.asarray(t.data), raw_shape=None if plain else t.data.shape, raw_dtype=t.tensor_type)
    return _finish(w, dst)


def _copy_fields(reader: gguf.GGUFReader, w: GGUFWriter, keep: Any) -> None:
    """Copy the key/values of ``reader`` that ``keep(key)`` accepts (never its header or architecture)."""
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == gguf.Keys.General.ARCHITECTURE or not keep(key):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub_type=sub)


def _finish(w: GGUFWriter, dst: str | os.PathLike[str]) -> Path:
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


# ---- mixtures of experts --------------------------------------------------------------------------------------

# Tiny random MoE models llama.cpp loads and answers with (F32 unless qtype says otherwise).
TINY_MOE: dict[str, dict[str, Any]] = {
    "qwen3moe": dict(n_layers=2, n_embd=64, n_head=4, n_head_kv=2, head_dim=32, n_ff=96, n_vocab=64,
                     moe=MoEShape(n_expert=4, n_expert_used=2, n_ff_exp=32)),
    # even layers slide over 128 tokens; MXFP4 experts as OpenAI ships them
    "gpt-oss": dict(n_layers=4, n_embd=64, n_head=4, n_head_kv=2, head_dim=32, n_ff=64, n_vocab=64,
                    sliding_window=128, moe=MoEShape(n_expert=4, n_expert_used=2, n_ff_exp=64, expert_qtype="MXFP4")),
    # the first layer dense, one shared expert
    "glm4moe": dict(n_layers=3, n_embd=64, n_head=4, n_head_kv=2, head_dim=32, n_ff=96, n_vocab=64,
                    moe=MoEShape(n_expert=4, n_expert_used=2, n_ff_exp=32, n_expert_shared=1, n_dense_lead=1)),
    # MLA: q_lora 32, a latent of 32 + 16 rope dims cached per token; head_dim = 32 nope + 16 rope
    "deepseek2": dict(n_layers=3, n_embd=64, n_head=4, n_head_kv=4, head_dim=48, n_ff=96, n_vocab=64,
                      moe=MoEShape(n_expert=4, n_expert_used=2, n_ff_exp=32, n_expert_shared=1, n_dense_lead=1,
                                   q_lora_rank=32, kv_lora_rank=32, rope_dim=16, v_head_dim=32)),
}


def write_moe_model(path: str | os.PathLike[str], arch: str, **overrides: Any) -> Path:
    """One of TINY_MOE, loadable by llama.cpp (a merge in the vocabulary), with ``overrides`` applied."""
    kw = {**TINY_MOE[arch], "merges": True, "tied": False, **overrides}
    return write_model(path, arch, **kw)


# Full-size shapes for header-only (sparse=True) files. Hyperparameters from each model's Hugging Face config.json:
# Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B (hidden_size, num_hidden_layers, num_attention_heads,
# num_key_value_heads, head_dim, intermediate_size, moe_intermediate_size, num_experts, num_experts_per_tok,
# vocab_size, max_position_embeddings, tie_word_embeddings false); openai/gpt-oss-120b (hidden_size 2880,
# 36 layers, 64 heads of 64, 8 KV heads, intermediate_size 2880, 128 local experts, 4 per token, vocab 201088,
# sliding_window 128 on alternate layers, 131072 context). gpt-oss ships MXFP4 experts and the rest in BF16, as in
# ggml-org/gpt-oss-120b-GGUF: write it with qtype="BF16".
QWEN3_30B_A3B = dict(n_layers=48, n_embd=2048, n_head=32, n_head_kv=4, head_dim=128, n_ff=6144, n_vocab=151936,
                     n_ctx=40960, tied=False, moe=MoEShape(n_expert=128, n_expert_used=8, n_ff_exp=768))
QWEN3_235B_A22B = dict(n_layers=94, n_embd=4096, n_head=64, n_head_kv=4, head_dim=128, n_ff=12288, n_vocab=151936,
                       n_ctx=40960, tied=False, moe=MoEShape(n_expert=128, n_expert_used=8, n_ff_exp=1536))
GPT_OSS_120B = dict(n_layers=36, n_embd=2880, n_head=64, n_head_kv=8, head_dim=64, n_ff=2880, n_vocab=201088,
                    n_ctx=131072, tied=False, sliding_window=128,
                    moe=MoEShape(n_expert=128, n_expert_used=4, n_ff_exp=2880, expert_qtype="MXFP4"))


def speaking_hi(path: str | os.PathLike[str]) -> Path:
    """A tiny model's vocabulary ("t0".."t63") cannot spell text: rename token "t1" to "hi" and the one merge "t 0"
    to "h i" in place (same lengths), so that the prompt "hi" is one token."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    for old, new in ((b"t1", b"hi"), (b"t 0", b"h i")):
        key = struct.pack("<Q", len(old)) + old
        at = data.find(key)
        assert at >= 0 and data.find(key, at + 1) < 0
        data[at:at + len(key)] = struct.pack("<Q", len(new)) + new
    path.write_bytes(bytes(data))
    return path
