"""The planner's values: request in, report out. Plain frozen dataclasses; bytes are ints; layer ranges are
half-open ``[start, end)``; speeds are tokens per second for one sequence."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mixrun.alloc import shares_of
from mixrun.vocab import Backend, KVType, Split, parse, shown


@dataclass(frozen=True)
class PlanRequest:
    """What the user asks for. ``split``/``backend`` of ``auto`` let the planner choose."""

    ctx: int = 4096
    batch: int = 1
    ubatch: int = 512
    kv_type: KVType = KVType.F16
    split: Split | None = None  # None: the planner chooses ("auto")
    backend: Backend | None = None  # None: the planner chooses ("auto")
    prompt_tokens: int = 512  # prefill speed is predicted for a prompt of this length
    tp_min_link_gbs: float = 0.0  # torch TP groups only over links at least this fast (0: the cost model decides)
    flash_attn: bool = True
    cpu_offload: bool = False  # let llama.cpp run the first layers on the CPU host (-ngl < layers)
    torch_gpu_util: float = 0.9  # share of a GPU's capacity the torch backend plans into (vLLM's default)
    # the llama.cpp build predicted for (`llama-server --version`); None: a 2025-26 build, as the constants describe
    llamacpp_build: int | None = None

    def __post_init__(self) -> None:
        """Names from the command line or the TUI (``"row"``, ``"auto"``) become the vocabulary's enums; a name
        that is not one is a ValueError naming the choices."""
        for name, enum in (("split", Split), ("backend", Backend)):
            object.__setattr__(self, name, parse(enum, getattr(self, name)))
        object.__setattr__(self, "kv_type", KVType(self.kv_type))

    def to_json(self) -> dict[str, Any]:
        out = {"ctx": self.ctx, "batch": self.batch, "kv_type": self.kv_type.value,
               "split": shown(self.split), "backend": shown(self.backend)}
        if self.cpu_offload:
            out["cpu_offload"] = True
        if self.llamacpp_build is not None:
            out["llamacpp_build"] = self.llamacpp_build
        return out


@dataclass(frozen=True)
class Group:
    """A pipeline stage: devices doing tensor parallelism over layers ``[start, end)``.

    ``kv_heads`` is a TP group's whole KV heads per device; they sum to the model's ``n_head_kv`` (empty for one
    device, which holds them all). ``shares`` is each device's fraction of every sharded matrix and of the KV
    cache; they sum to 1. A TP group's shares are derived from its ``kv_heads`` (the matrix rows follow the heads);
    only llama.cpp's row split, whose KV cache stays on the main GPU, gives shares without heads."""

    devices: tuple[str, ...]
    layers: tuple[int, int]
    shares: tuple[float, ...] = ()
    kv_heads: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        where = f"group {list(self.devices)}"
        if self.kv_heads:
            kv = self.kv_heads
            if len(kv) != self.tp or not all(isinstance(k, int) and k >= 1 for k in kv):
                raise ValueError(f"{where}: KV heads {list(kv)} must be one whole number per device, each at least 1")
            derived = shares_of(kv)
            if self.shares not in ((), derived):
                raise ValueError(f"{where}: shares {list(self.shares)} are not its KV heads' {list(derived)}")
            object.__setattr__(self, "shares", derived)
        elif not self.shares:
            if self.tp > 1:
                raise ValueError(f"{where}: a TP group needs its KV heads (or, split by rows, its shares)")
            object.__setattr__(self, "shares", (1.0,))

    @property
    def tp(self) -> int:
        return len(self.devices)

    @property
    def n_layers(self) -> int:
        return self.layers[1] - self.layers[0]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"devices": list(self.devices), "tp": self.tp, "layers": list(self.layers)}
        if self.tp > 1:
            out["shares"] = [round(s, 4) for s in self.shares]
            if self.kv_heads:
                out["kv_heads"] = list(self.kv_heads)
        return out


@dataclass(frozen=True)
class DeviceUse:
    """Bytes one device holds under a candidate, against what it may hold."""

    id: str
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    overhead_bytes: int
    capacity_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes + self.overhead_bytes

    @property
    def shortfall_bytes(self) -> int:
        return max(0, self.total_bytes - self.capacity_bytes)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes

    def to_json(self) -> dict[str, Any]:
        out = {"id": self.id, "weights_bytes": self.weights_bytes, "kv_bytes": self.kv_bytes,
               "compute_bytes": self.compute_bytes, "overhead_bytes": self.overhead_bytes,
               "total_bytes": self.total_bytes, "capacity_bytes": self.capacity_bytes}
        if not self.fits:
            out["shortfall_bytes"] = self.shortfall_bytes
        return out


@dataclass(frozen=True)
class Timing:
    """Predicted seconds per token, by part, so a plan can say where its time goes."""

    compute_s: float
    tp_comm_s: float
    handoff_s: float
    overhead_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.tp_comm_s + self.handoff_s + self.overhead_s


@dataclass(frozen=True)
class Candidate:
    split: Split
    backend: Backend
    label: str  # e.g. "llama.cpp layer, optimized -ts"
    groups: tuple[Group, ...]
    devices: tuple[DeviceUse, ...]
    decode_tok_s: float
    prefill_tok_s: float
    decode: Timing
    why: str = ""
    commands: dict[str, str] = field(default_factory=dict)
    llama_kwargs: dict[str, Any] = field(default_factory=dict)
    measured: bool = False  # decode/prefill figures come from the profile's recorded results
    # the cost model's own figures where recorded results replaced or scaled them (None: decode_tok_s is the model's)
    predicted_decode_tok_s: float | None = None
    predicted_prefill_tok_s: float | None = None

    @property
    def fits(self) -> bool:
        return all(d.fits for d in self.devices)

    @property
    def model_decode_tok_s(self) -> float:
        """The cost model's decode prediction, before any recorded result replaced or scaled it."""
        return self.predicted_decode_tok_s if self.predicted_decode_tok_s is not None else self.decode_tok_s

    @property
    def model_prefill_tok_s(self) -> float:
        return self.predicted_prefill_tok_s if self.predicted_prefill_tok_s is not None else self.prefill_tok_s


    def to_json(self) -> dict[str, Any]:
        out = {
            "split": self.split.value, "backend": self.backend.value, "label": self.label, "fits": self.fits,
            "decode_tok_s": round(self.decode_tok_s, 2), "prefill_tok_s": round(self.prefill_tok_s, 1),
            "groups": [g.to_json() for g in self.groups], "devices": [d.to_json() for d in self.devices],
            "why": self.why, "commands": dict(self.commands),
        }
        if self.llama_kwargs:
            out["llama_cpp_kwargs"] = dict(self.llama_kwargs)
        if self.measured:
            out["measured"] = True
        if self.predicted_decode_tok_s is not None:  # the cost model's own figures, before recorded results
            out["predicted_decode_tok_s"] = round(self.predicted_decode_tok_s, 2)
            out["predicted_prefill_tok_s"] = round(self.model_prefill_tok_s, 1)
        return out


@dataclass(frozen=True)
class Suggestion:
    """A change that makes a non-fitting model fit, checked by re-planning."""

    what: str
    change: dict[str, Any]
    decode_tok_s: float


@dataclass(frozen=True)
class PlanReport:
    model: dict[str, Any]
    profile: str
    request: PlanRequest
    candidates: tuple[Candidate, ...]
    chosen: int | None
    suggestions: tuple[Suggestion, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def best(self) -> Candidate | None:
        return None if self.chosen is None else self.candidates[self.chosen]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "profile": self.profile, "request": self.request.to_json(),
                               "chosen": self.chosen, "candidates": [c.to_json() for c in self.candidates]}
        if self.suggestions:
            out["suggestions"] = [{"what": s.what, "change": s.change, "decode_tok_s": round(s.decode_tok_s, 2)}
                                  for s in self.suggestions]
        if self.notes:
            out["notes"] = list(self.notes)
        return out
