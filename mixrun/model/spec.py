"""ModelSpec: what a model needs, as plain frozen values built from GGUF metadata and tensor infos.

Conventions:
- Tensor shapes are in row-major (PyTorch/NumPy) order, outermost first: ``token_embd.weight`` is
  ``(n_vocab, n_embd)`` and ``blk.0.attn_q.weight`` is ``(n_head * head_dim, n_embd)``. GGML's ne0-first order
  is reversed once, in ``mixrun.model.gguf.parse_part``.
- Bytes are ints named ``*_bytes``. Layer indices are 0-based.
- Mixtures of experts: a layer's routed experts (``ffn_*_exps``) are its expert bytes, everything else in the layer
  (attention, router, shared experts) its dense bytes; a batch-1 decode step reads the dense bytes and
  ``used / count`` of the expert bytes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from gguf import GGML_QUANT_SIZES, MODEL_TENSOR, TENSOR_NAMES, GGMLQuantizationType, Keys

from mixrun.errors import GGUFError, where
from mixrun.vocab import PLANNABLE_ARCHS, KVType

_MAX_LAYERS = 4096
_MAX_DIM = 1 << 24
_MAX_EXPERTS = 1024  # llama.cpp's LLAMA_MAX_EXPERTS (src/llama-hparams.h)
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")


def _bases(*kinds: MODEL_TENSOR) -> frozenset[str]:
    """The per-layer name stems (``ffn_up_exps``) of these tensor kinds, from gguf-py's name table."""
    return frozenset(TENSOR_NAMES[k].split(".")[-1] for k in kinds)


# Routed experts: stacked (n_expert, ...) tensors of which a token reads expert_used_count slices. Their weights,
# biases (gpt-oss) and scales all end in one of these stems; llama.cpp's `-ot exps=CPU` matches the same names.
ROUTED_EXPERT_BASES = _bases(MODEL_TENSOR.FFN_GATE_EXP, MODEL_TENSOR.FFN_UP_EXP, MODEL_TENSOR.FFN_DOWN_EXP,
                             MODEL_TENSOR.FFN_GATE_UP_EXP)
# Shared experts run for every token, like a dense FFN; the router (gate_inp) and its bias select the experts.
SHARED_EXPERT_BASES = _bases(MODEL_TENSOR.FFN_GATE_SHEXP, MODEL_TENSOR.FFN_UP_SHEXP, MODEL_TENSOR.FFN_DOWN_SHEXP,
                             MODEL_TENSOR.FFN_GATE_INP_SHEXP)
ROUTER_BASES = _bases(MODEL_TENSOR.FFN_GATE_INP, MODEL_TENSOR.FFN_EXP_PROBS_B)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor: its GGML type name (``Q4_K``), row-major shape, element count and bytes on disk."""

    name: str
    qtype: str
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int

    @cached_property
    def layer(self) -> int | None:
        m = _LAYER_RE.match(self.name)
        return int(m.group(1)) if m else None

    @cached_property
    def base(self) -> str:
        """The name without ``blk.N.`` and the ``.weight``/``.bias`` suffix: ``ffn_up_exps``."""
        parts = self.name.split(".")
        return parts[2] if self.layer is not None and len(parts) > 2 else parts[0]

    @property
    def routed_expert(self) -> bool:
        return self.layer is not None and self.base in ROUTED_EXPERT_BASES


@dataclass(frozen=True)
class KVLayer:
    """What one layer stores per token in the KV cache: heads and per-head K and V widths.

    DeepSeek's MLA caches one compressed latent per token (``n_head_kv`` 1, ``k_dim`` = kv_lora_rank + rope dim)
    and no V (``v_dim`` 0: llama.cpp reads V as a view of K). A layer with no cache (a NextN/MTP layer) has
    ``n_head_kv`` 0."""

    n_head_kv: int
    k_dim: int
    v_dim: int
    sliding: bool = False  # a sliding-window layer: llama.cpp caps its cache at the window


@dataclass(frozen=True)
class RopeSpec:
    dim: int
    freq_base: float
    scaling_type: str | None = None
    scaling_factor: float | None = None
    original_ctx: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    """Everything the planner needs to know about a model, and what ``mixrun inspect`` shows."""

    source: str
    files: tuple[str, ...]
    file_bytes: int
    arch: str
    name: str
    file_type: str | None
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    head_dim_v: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    rope: RopeSpec
    tied_output: bool
    sliding_window: int | None
    kv_layers: tuple[KVLayer, ...]
    tensors: tuple[TensorSpec, ...]
    layer_bytes: tuple[int, ...]
    other_bytes: dict[str, int] = field(hash=False)
    total_bytes: int = 0
    n_params: int = 0
    tokenizer_model: str | None = None
    has_chat_template: bool = False
    not_plannable: str | None = None  # why the planner cannot use this model, or None
    # Mixture of experts (all 0 for a dense model). expert_used_count may differ per layer: layer_expert_used.
    n_expert: int = 0  # {arch}.expert_count: routed experts per MoE layer
    n_expert_used: int = 0  # {arch}.expert_used_count: experts each token runs (the largest over layers)
    n_expert_shared: int = 0  # {arch}.expert_shared_count: always-on shared experts (*_shexp)
    n_ff_exp: int = 0  # {arch}.expert_feed_forward_length: one expert's FFN width
    n_layer_dense_lead: int = 0  # {arch}.leading_dense_block_count: the first layers have a dense FFN
    n_layer_nextn: int = 0  # {arch}.nextn_predict_layers: trailing MTP layers (no KV cache in llama.cpp)
    layer_expert_used: tuple[int, ...] = ()  # experts a token runs in each layer (0 for dense layers)
    kv_lora_rank: int = 0  # MLA (deepseek2): the compressed KV latent's width, 0 without MLA
    kv_note: str | None = None  # why kv_bytes_per_token is approximate for this model, or None when exact

    @property
    def plannable(self) -> bool:
        return self.not_plannable is None

    # ---- mixture of experts -------------------------------------------------------------------------------------

    @cached_property
    def _moe_tally(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Per layer: routed-expert bytes, shared-expert bytes, router bytes, routed-expert elements."""
        routed, shared, router, elems = ([0] * self.n_layers for _ in range(4))
        for t in self.tensors:
            if t.layer is None or t.layer >= self.n_layers:
                continue
            if t.base in ROUTED_EXPERT_BASES:
                routed[t.layer] += t.n_bytes
                elems[t.layer] += t.n_elements
            elif t.base in SHARED_EXPERT_BASES:
                shared[t.layer] += t.n_bytes
            elif t.base in ROUTER_BASES:
                router[t.layer] += t.n_bytes
        return tuple(routed), tuple(shared), tuple(router), tuple(elems)

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0 and any(self.layer_expert_bytes)

    @property
    def layer_expert_bytes(self) -> tuple[int, ...]:
        """Routed-expert bytes per layer (``ffn_{gate,up,down}_exps``, fused ``ffn_gate_up_exps``, their biases):
        what can live apart from the rest of the layer. 0 for dense layers and dense models."""
        return self._moe_tally[0]

    @property
    def layer_shared_expert_bytes(self) -> tuple[int, ...]:
        """Shared-expert bytes per layer (``*_shexp``): read by every token, part of the dense bytes."""
        return self._moe_tally[1]

    @property
    def layer_router_bytes(self) -> tuple[int, ...]:
        """Router bytes per layer (``ffn_gate_inp``, ``exp_probs_b``): part of the dense bytes."""
        return self._moe_tally[2]

    @property
    def layer_dense_bytes(self) -> tuple[int, ...]:
        """Everything else in each layer (attention, norms, router, shared experts, a dense FFN)."""
        return tuple(b - e for b, e in zip(self.layer_bytes, self.layer_expert_bytes, strict=True))

    def _used(self, layer: int) -> int:
        return self.layer_expert_used[layer] if layer < len(self.layer_expert_used) else self.n_expert_used

    @cached_property
    def layer_decode_bytes(self) -> tuple[int, ...]:
        """Bytes one decode step at batch 1 reads per layer: the dense part plus ``used / count`` of the experts."""
        return tuple(d + (e * self._used(i) // self.n_expert if self.n_expert else e)
                     for i, (d, e) in enumerate(zip(self.layer_dense_bytes, self.layer_expert_bytes, strict=True)))

    @property
    def head_bytes(self) -> int:
        """The output projection and its norm (a tied output reads token_embd); the embedding lookup reads a row."""
        out = self.other_bytes.get("output.weight", self.other_bytes.get("token_embd.weight", 0)
                                   if self.tied_output else 0)
        return out + self.other_bytes.get("output_norm.weight", 0)

    def decode_read_bytes(self, layers: range | None = None, *, head: bool | None = None) -> int:
        """Bytes a batch-1 decode step reads over ``layers`` (all by default), plus the output head when ``head``
        (default: when all layers are asked for)."""
        per = self.layer_decode_bytes
        total = sum(per) if layers is None else sum(per[i] for i in layers)
        return total + (self.head_bytes if (layers is None if head is None else head) else 0)

    @property
    def expert_bytes(self) -> int:
        return sum(self.layer_expert_bytes)

    @property
    def expert_share(self) -> float:
        """The routed experts' share of the weight bytes (0.0 for a dense model)."""
        return self.expert_bytes / self.total_bytes if self.total_bytes else 0.0

    @property
    def n_active_params(self) -> int:
        """Parameters one token uses: all but the routed experts, plus ``used / count`` of those (embeddings
        included, as the published "A3B"-style counts do)."""
        elems = self._moe_tally[3]
        if not self.n_expert:
            return self.n_params
        return self.n_params - sum(elems) + sum(e * self._used(i) // self.n_expert for i, e in enumerate(elems))

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.total_bytes / self.n_params if self.n_params else 0.0

    def quant_mix(self) -> dict[str, tuple[int, int]]:
        """GGML type -> (tensor count, bytes), largest first."""
        mix: dict[str, list[int]] = {}
        for t in self.tensors:
            m = mix.setdefault(t.qtype, [0, 0])
            m[0] += 1
            m[1] += t.n_bytes
        return {k: (v[0], v[1]) for k, v in sorted(mix.items(), key=lambda kv: -kv[1][1])}

    def kv_bytes_per_token(self, cache_type: str = KVType.F16, layers: range | None = None) -> int:
        """KV-cache bytes one token costs over ``layers`` (all by default) for a cache of ``cache_type``."""
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[cache_type.upper()]]
        rows = self.kv_layers if layers is None else [self.kv_layers[i] for i in layers]
        total = 0
        for kv in rows:
            for width in (kv.k_dim, kv.v_dim):
                total += kv.n_head_kv * math.ceil(width / block) * size
        return total

    def to_json(self, with_tensors: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.source, "files": list(self.files), "file_bytes": self.file_bytes,
            "arch": self.arch, "name": self.name, "file_type": self.file_type,
            "plannable": self.plannable, "not_plannable": self.not_plannable,
            "n_layers": self.n_layers, "n_embd": self.n_embd, "n_head": self.n_head, "n_head_kv": self.n_head_kv,
            "head_dim": self.head_dim, "head_dim_v": self.head_dim_v, "n_ff": self.n_ff, "n_vocab": self.n_vocab,
            "n_ctx_train": self.n_ctx_train,
            "rope": {"dim": self.rope.dim, "freq_base": self.rope.freq_base, "scaling_type": self.rope.scaling_type,
                     "scaling_factor": self.rope.scaling_factor, "original_ctx": self.rope.original_ctx},
            "tied_output": self.tied_output, "sliding_window": self.sliding_window,
            "weights_bytes": self.total_bytes, "n_params": self.n_params,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "layer_bytes": list(self.layer_bytes), "other_bytes": dict(self.other_bytes),
            "kv_bytes_per_token": {t.value: self.kv_bytes_per_token(t) for t in KVType},
            "quant_mix": {k: {"tensors": c, "bytes": b} for k, (c, b) in self.quant_mix().items()},
            "tokenizer_model": self.tokenizer_model, "has_chat_template": self.has_chat_template,
            "kv_note": self.kv_note, "n_active_params": self.n_active_params,
            "decode_read_bytes": self.decode_read_bytes(), "moe": self._moe_json(),
        }
        if with_tensors:
            out["tensors"] = [{"name": t.name, "type": t.qtype, "shape": list(t.shape), "bytes": t.n_bytes}
                              for t in self.tensors]
        return out

    def _moe_json(self) -> dict[str, Any] | None:
        if not self.is_moe:
            return None
        return {"n_expert": self.n_expert, "n_expert_used": self.n_expert_used,
                "n_expert_shared": self.n_expert_shared, "n_ff_exp": self.n_ff_exp,
                "leading_dense_blocks": self.n_layer_dense_lead, "nextn_layers": self.n_layer_nextn,
                "expert_bytes": self.expert_bytes, "dense_bytes": self.total_bytes - self.expert_bytes,
                "expert_share": round(self.expert_share, 4), "layer_expert_used": list(self.layer_expert_used),
                "layer_expert_bytes": list(self.layer_expert_bytes),
                "layer_dense_bytes": list(self.layer_dense_bytes)}


class _Meta:
    """Typed, bounded access to one file's metadata for one architecture."""

    def __init__(self, source: str, arch: str, fields: dict[str, Any]) -> None:
        self.source, self.arch, self.fields = source, arch, fields

    def raw(self, key: str) -> Any:
        return self.fields.get(key.format(arch=self.arch))

    def int(self, key: str, default: int | None = None, *, lo: int = 0, hi: int = _MAX_DIM) -> int | None:
        name = key.format(arch=self.arch)
        v = self.fields.get(name)
        if v is None:
            return default
        if isinstance(v, list):  # per-layer values (e.g. head_count_kv on some models): the largest governs
            if not v:
                return default
            v = max(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise GGUFError(where(self.source, f"{name} is {v!r}, expected an integer"))
        if not lo <= v <= hi:
            raise GGUFError(where(self.source, f"{name} is {v:,}, outside {lo:,}..{hi:,}"))
        return v

    def float(self, key: str, default: float | None = None) -> float | None:
        name = key.format(arch=self.arch)
        v = self.fields.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise GGUFError(where(self.source, f"{name} is {v!r}, expected a finite number"))
        return float(v)

    def per_layer(self, key: str, n_layers: int, default: int) -> list[int]:
        v = self.raw(key)
        if isinstance(v, list):
            if len(v) != n_layers:
                raise GGUFError(where(self.source, f"{key.format(arch=self.arch)} has {len(v)} entries for "
                                                   f"{n_layers} layers"))
            bad = next((x for x in v if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= _MAX_DIM), None)
            if bad is not None:
                raise GGUFError(where(self.source, f"{key.format(arch=self.arch)} holds {bad!r}, expected integers "
                                                   f"in 0..{_MAX_DIM:,}"))
            return list(v)
        return [self.int(key, default) or default] * n_layers


def _swa_layers(arch: str, meta: _Meta, n_layers: int) -> list[bool]:
    """Which layers use sliding-window attention, as llama.cpp decides it."""
    if not meta.int(Keys.Attention.SLIDING_WINDOW, 0):
        return [False] * n_layers
    pattern = meta.raw(Keys.Attention.SLIDING_WINDOW_PATTERN)
    if isinstance(pattern, list) and len(pattern) == n_layers:
        return [bool(x) for x in pattern]
    # llama.cpp set_swa_pattern(n): layer il is SWA when il % n < n - 1 (gemma2: n=2, gemma3: n=6; gpt-oss: n=2,
    # src/models/openai-moe.cpp load_arch_hparams calls load_swa_pattern(ml, 2): even layers slide)
    n = {"gemma2": 2, "gemma3": 6, "gpt-oss": 2}.get(arch)
    if isinstance(pattern, int) and pattern > 0:
        n = pattern
    if n is None:
        return [False] * n_layers
    return [il % n < n - 1 for il in range(n_layers)]


@dataclass(frozen=True)
class _MoEMeta:
    n_expert: int
    used: tuple[int, ...]  # per layer; 0 for a layer without routed experts
    n_expert_shared: int
    n_ff_exp: int
    n_layer_dense_lead: int
    n_layer_nextn: int


def _read_moe(source: str, arch: str, meta: _Meta, tensors: Sequence[TensorSpec], n_layers: int) -> _MoEMeta:
    """The expert counts, checked against each other and against the expert tensors, as llama.cpp checks them
    (src/llama-model.cpp load_hparams: n_expert <= LLAMA_MAX_EXPERTS, expert_used_count <= n_expert and > 0 when
    there are experts). Per-layer values stay within the layer limit: one entry per layer."""
    def key(k: str) -> str:
        return k.format(arch=arch)

    n_expert = meta.int(Keys.LLM.EXPERT_COUNT, 0, hi=_MAX_EXPERTS) or 0
    used = meta.per_layer(Keys.LLM.EXPERT_USED_COUNT, n_layers, 0)
    shared = meta.int(Keys.LLM.EXPERT_SHARED_COUNT, 0, hi=_MAX_EXPERTS) or 0
    n_ff_exp = meta.int(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, 0) or 0
    lead = meta.int(Keys.LLM.LEADING_DENSE_BLOCK_COUNT, 0, hi=n_layers) or 0
    nextn = meta.int(Keys.LLM.NEXTN_PREDICT_LAYERS, 0, hi=n_layers) or 0
    expert_layers = [False] * n_layers
    for t in tensors:
        if not t.routed_expert or t.layer is None or t.layer >= n_layers:
            continue
        expert_layers[t.layer] = True
        if n_expert == 0:
            raise GGUFError(where(source, f"tensor {t.name!r} holds experts but {key(Keys.LLM.EXPERT_COUNT)} is "
                                          f"{'0' if meta.raw(Keys.LLM.EXPERT_COUNT) is not None else 'missing'}"))
        if t.shape[0] != n_expert:  # row-major: the experts are the outermost dimension
            raise GGUFError(where(source, f"tensor {t.name!r} is {' x '.join(map(str, t.shape))}, but the metadata "
                                          f"say {n_expert:,} experts ({key(Keys.LLM.EXPERT_COUNT)})"))
    over = max(used, default=0)
    if over > n_expert:
        raise GGUFError(where(source, f"{key(Keys.LLM.EXPERT_USED_COUNT)} is {over:,}, more than "
                                      f"{key(Keys.LLM.EXPERT_COUNT)} = {n_expert:,}"))
    for i, has in enumerate(expert_layers):
        if has and used[i] == 0:
            raise GGUFError(where(source, f"layer {i} has experts but {key(Keys.LLM.EXPERT_USED_COUNT)} is "
                                          f"{'0' if meta.raw(Keys.LLM.EXPERT_USED_COUNT) is not None else 'missing'}"))
    used_per_layer = tuple(u if has else 0 for u, has in zip(used, expert_layers, strict=True))
    return _MoEMeta(n_expert, used_per_layer if n_expert else (), shared, n_ff_exp, lead, nextn)


# Architectures that also read the MLA keys but whose cache llama.cpp builds another way (src/llama-model.cpp
# create_memory: llama_kv_cache_dsa with an indexer cache, hybrid recurrent memory): not modelled.
_KV_NOT_MODELLED = frozenset({"deepseek32", "glm-dsa", "glm5-next", "hy-v4", "kimi-k3", "kimi-linear", "bailingmoe3",
                              "dots3note"})


def _kv_layers(arch: str, meta: _Meta, kv_heads: list[int], head_dim: int, head_dim_v: int, swa: list[bool],
               n_nextn: int) -> tuple[tuple[KVLayer, ...], int, str | None]:
    """Each layer's KV cache row as llama.cpp allocates it, the MLA latent width, and a note when approximate.

    Read from llama.cpp as vendored by llama-cpp-python 0.3.36:
    - src/llama-kv-cache.cpp, llama_kv_cache::llama_kv_cache: per layer, K is ``n_embd_k_gqa(il)`` wide and V
      ``n_embd_v_gqa(il)`` (src/llama-hparams.cpp: ``n_embd_head_k(il) * n_head_kv(il)``, head widths from
      ``{arch}.attention.key_length``/``value_length``). qwen3moe, glm4moe and gpt-oss use this plain cache; gpt-oss
      also makes even layers sliding-window (llama_kv_cache_iswa, see _swa_layers). Its attention sinks
      (``attn_sinks``, one scalar per head) are weights, not cache.
    - The same constructor, ``has_v = !hparams.is_mla()``: with MLA (deepseek2 files that carry
      ``key_length_mla``/``value_length_mla``, hparams.is_mla()) only K is allocated, ``n_head_kv`` (1) x
      ``key_length`` (= kv_lora_rank + rope dim: the compressed latent and the shared RoPE key), and V is a view
      of it. Older deepseek2 files without the MLA keys cache K and V per head like any model.
    - src/llama-model.cpp create_memory: with ``{arch}.nextn_predict_layers`` > 0 the main context's cache filters
      ``il < n_layer()``: the trailing NextN/MTP layers have no cache.
    """
    n_layers = len(kv_heads)
    mla = arch == "deepseek2" and bool(meta.int(Keys.Attention.KEY_LENGTH_MLA, 0)) \
        and bool(meta.int(Keys.Attention.VALUE_LENGTH_MLA, 0))
    rank = meta.int(Keys.Attention.KV_LORA_RANK, 0) or 0
    note = None
    if arch in _KV_NOT_MODELLED:
        note = (f"llama.cpp builds its own kind of cache for {arch} (MLA with an indexer, or recurrent state); "
                "mixrun sizes it as plain K and V per head, so the KV bytes are approximate")
    if mla:
        rope = meta.int(Keys.Rope.DIMENSION_COUNT, 0) or 0
        if rank and head_dim != rank + rope:
            note = (f"MLA key_length {head_dim} is not kv_lora_rank {rank} + rope dim {rope}: the cache is sized "
                    "from key_length, as llama.cpp does, but the file is unusual")
    rows = []
    for i in range(n_layers):
        if i >= n_layers - n_nextn:
            rows.append(KVLayer(0, head_dim, 0 if mla else head_dim_v, False))
        else:
            rows.append(KVLayer(kv_heads[i], head_dim, 0 if mla else head_dim_v, swa[i]))
    return tuple(rows), rank if mla else 0, note


def tally_bytes(tensors: Sequence[TensorSpec], n_layers: int) -> tuple[tuple[int, ...], dict[str, int]]:
    """Bytes per layer, and bytes of each tensor outside the layers."""
    layer_bytes = [0] * n_layers
    other: dict[str, int] = {}
    for t in tensors:
        if t.layer is None:
            other[t.name] = t.n_bytes
        else:
            layer_bytes[t.layer] += t.n_bytes
    return tuple(layer_bytes), other


def with_tensors(spec: ModelSpec, tensors: Sequence[TensorSpec]) -> ModelSpec:
    """The same model with these tensors (another quant of it, say): byte tallies recomputed."""
    layer_bytes, other = tally_bytes(tensors, spec.n_layers)
    return replace(spec, tensors=tuple(tensors), layer_bytes=layer_bytes, other_bytes=other,
                               total_bytes=sum(t.n_bytes for t in tensors))


def _check_shapes(source: str, arch: str, meta: _Meta, by_name: dict[str, TensorSpec], n_layers: int, n_embd: int,
                  kv_heads: list[int], head_dim: int, head_dim_v: int) -> None:
    """Every tensor the planner sizes from the metadata must have the shape the metadata give it (row-major; ``None``
    matches any size); a contradiction names the tensor. Only for the plannable architectures."""
    def expect(name: str, shape: tuple[int | None, ...], why: str) -> None:
        t = by_name.get(name)
        if t is None:
            return
        if len(t.shape) != len(shape) or any(w is not None and w != d for w, d in zip(shape, t.shape, strict=False)):
            want = " x ".join("*" if w is None else str(w) for w in shape)
            got = " x ".join(map(str, t.shape))
            raise GGUFError(where(source, f"tensor {name!r} is {got}, but the metadata say {want} "
                                          f"({why})"))

    n_heads = meta.per_layer(Keys.Attention.HEAD_COUNT, n_layers, 0)
    # MLA (deepseek2): key/value_length describe the cached latent; the heads' own widths are the _mla keys
    q_dim = meta.int(Keys.Attention.KEY_LENGTH_MLA, 0) or head_dim if arch == "deepseek2" else head_dim
    o_dim = meta.int(Keys.Attention.VALUE_LENGTH_MLA, 0) or head_dim_v if arch == "deepseek2" else head_dim_v
    has_ff = meta.raw(Keys.LLM.FEED_FORWARD_LENGTH) is not None
    n_ffs = meta.per_layer(Keys.LLM.FEED_FORWARD_LENGTH, n_layers, 0) if has_ff else [None] * n_layers
    emb = f"{arch}.embedding_length"
    expect("token_embd.weight", (None, n_embd), emb)
    expect("output.weight", (None, n_embd), emb)
    expect("output_norm.weight", (n_embd,), emb)
    for i in range(n_layers):
        b, q, kv = f"blk.{i}.", n_heads[i] * q_dim, kv_heads[i]
        heads = f"{emb}, head_count {n_heads[i]}, head_count_kv {kv}, head dims {head_dim}/{head_dim_v}"
        expect(b + "attn_norm.weight", (n_embd,), emb)
        expect(b + "ffn_norm.weight", (n_embd,), emb)
        expect(b + "attn_q.weight", (q, n_embd), heads)
        expect(b + "attn_k.weight", (kv * head_dim, n_embd), heads)
        expect(b + "attn_v.weight", (kv * head_dim_v, n_embd), heads)
        expect(b + "attn_qkv.weight", (q + kv * (head_dim + head_dim_v), n_embd), heads)
        expect(b + "attn_output.weight", (n_embd, n_heads[i] * o_dim), heads)
        ff = f"{emb}, {arch}.feed_forward_length {n_ffs[i]}"
        expect(b + "ffn_gate.weight", (n_ffs[i], n_embd), ff)
        up = n_ffs[i] * 2 if arch == "phi3" and n_ffs[i] is not None and b + "ffn_gate.weight" not in by_name \
            else n_ffs[i]
        expect(b + "ffn_up.weight", (up, n_embd), ff)
        expect(b + "ffn_down.weight", (n_embd, n_ffs[i]), ff)


def build_spec(*, source: str, files: tuple[str, ...], file_bytes: int, fields: dict[str, Any],
               array_lengths: dict[str, int], tensors: list[TensorSpec]) -> ModelSpec:
    if not tensors:
        raise GGUFError(where(source, "holds no tensors (a vocab-only file?): nothing to run"))
    arch = fields.get(Keys.General.ARCHITECTURE)
    if not isinstance(arch, str) or not arch:
        raise GGUFError(where(source, "no general.architecture key"))
    meta = _Meta(source, arch, fields)
    by_name = {t.name: t for t in tensors}

    top = max((t.layer for t in tensors if t.layer is not None), default=None)
    n_layers = meta.int(Keys.LLM.BLOCK_COUNT, None, lo=1, hi=_MAX_LAYERS)
    missing = [k for k in (Keys.LLM.BLOCK_COUNT, Keys.LLM.EMBEDDING_LENGTH, Keys.Attention.HEAD_COUNT)
               if meta.raw(k) is None]
    if n_layers is None:  # no block_count: the layers are what the tensors name, within the same bound
        if top is not None and top >= _MAX_LAYERS:
            raise GGUFError(where(source, f"tensor blk.{top} is past mixrun's limit of {_MAX_LAYERS:,} layers "
                                          f"(and there is no {arch}.block_count)"))
        n_layers = top + 1 if top is not None else 0
    if top is not None and top >= n_layers:
        raise GGUFError(where(source, f"tensor blk.{top} is past {arch}.block_count = {n_layers}"))
    plannable = arch in PLANNABLE_ARCHS

    embd = by_name.get("token_embd.weight")
    n_embd = meta.int(Keys.LLM.EMBEDDING_LENGTH, embd.shape[-1] if embd else 0) or 0
    n_head = meta.int(Keys.Attention.HEAD_COUNT, 0) or 0
    n_head_kv = meta.int(Keys.Attention.HEAD_COUNT_KV, n_head) or 0
    head_dim = meta.int(Keys.Attention.KEY_LENGTH, n_embd // n_head if n_head else 0, lo=int(plannable)) or 0
    head_dim_v = meta.int(Keys.Attention.VALUE_LENGTH, head_dim, lo=int(plannable)) or 0
    n_ff = meta.int(Keys.LLM.FEED_FORWARD_LENGTH, 0) or 0
    n_vocab = meta.int(Keys.LLM.VOCAB_SIZE, array_lengths.get(Keys.Tokenizer.LIST)
                       or (embd.shape[0] if embd else 0), hi=1 << 26) or 0
    n_ctx_train = meta.int(Keys.LLM.CONTEXT_LENGTH, 0, hi=1 << 31) or 0

    swa = _swa_layers(arch, meta, n_layers)
    kv_heads = meta.per_layer(Keys.Attention.HEAD_COUNT_KV, n_layers, n_head_kv)
    moe = _read_moe(source, arch, meta, tensors, n_layers)
    kv_layers, kv_lora_rank, kv_note = _kv_layers(arch, meta, kv_heads, head_dim, head_dim_v, swa, moe.n_layer_nextn)

    layer_bytes, other = tally_bytes(tensors, n_layers)
    scaling = meta.raw(Keys.Rope.SCALING_TYPE)
    rope = RopeSpec(dim=meta.int(Keys.Rope.DIMENSION_COUNT, head_dim) or 0,
                    freq_base=meta.float(Keys.Rope.FREQ_BASE, 10000.0) or 10000.0,
                    scaling_type=scaling if isinstance(scaling, str) else None,
                    scaling_factor=meta.float(Keys.Rope.SCALING_FACTOR),
                    original_ctx=meta.int(Keys.Rope.SCALING_ORIG_CTX_LEN, None, hi=1 << 31))

    if plannable and not missing:
        _check_shapes(source, arch, meta, by_name, n_layers, n_embd, kv_heads, head_dim, head_dim_v)

    not_plannable = None
    if not plannable:
        not_plannable = f"architecture {arch!r} is not plannable yet (mixrun plans {', '.join(sorted(PLANNABLE_ARCHS))})"
    elif missing:
        not_plannable = "missing metadata: " + ", ".join(k.format(arch=arch) for k in missing)
    elif n_head_kv == 0 or n_head % n_head_kv:
        not_plannable = f"{n_head} attention heads cannot be grouped over {n_head_kv} KV heads"

    file_type = fields.get(Keys.General.FILE_TYPE)
    if isinstance(file_type, int):
        from gguf import LlamaFileType

        try:
            file_type = LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            file_type = str(file_type)
    name = fields.get(Keys.General.NAME)
    tok = fields.get(Keys.Tokenizer.MODEL)
    return ModelSpec(
        source=source, files=files, file_bytes=file_bytes, arch=arch,
        name=name if isinstance(name, str) else "", file_type=file_type if isinstance(file_type, str) else None,
        n_layers=n_layers, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
        head_dim_v=head_dim_v, n_ff=n_ff, n_vocab=n_vocab, n_ctx_train=n_ctx_train, rope=rope,
        tied_output="output.weight" not in by_name, sliding_window=meta.int(Keys.Attention.SLIDING_WINDOW, None),
        kv_layers=kv_layers, tensors=tuple(tensors), layer_bytes=layer_bytes, other_bytes=other,
        total_bytes=sum(t.n_bytes for t in tensors), n_params=sum(t.n_elements for t in tensors),
        tokenizer_model=tok if isinstance(tok, str) else None,
        has_chat_template=isinstance(fields.get(Keys.Tokenizer.CHAT_TEMPLATE), str),
        not_plannable=not_plannable, n_expert=moe.n_expert, n_expert_used=max(moe.used, default=0),
        n_expert_shared=moe.n_expert_shared, n_ff_exp=moe.n_ff_exp, n_layer_dense_lead=moe.n_layer_dense_lead,
        n_layer_nextn=moe.n_layer_nextn, layer_expert_used=moe.used, kv_lora_rank=kv_lora_rank, kv_note=kv_note,
    )
