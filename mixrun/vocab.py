"""mixrun's vocabulary: the one place split modes, backends, KV-cache types and each backend's architectures are
named. Everything else imports these; the CLI, the TUI and the plan JSON show their values."""

from __future__ import annotations

from enum import StrEnum

AUTO = "auto"  # what a request says when it lets the planner choose (a split or a backend)


class Split(StrEnum):
    NONE = "none"  # one device holds everything
    LAYER = "layer"  # llama.cpp -sm layer: contiguous layer ranges, one device each
    ROW = "row"  # llama.cpp -sm row: every matrix split by rows, results gathered on the main GPU
    TENSOR = "tensor"  # tensor parallel over all devices (llama.cpp -sm tensor, or torch TP in one group)
    HYBRID = "hybrid"  # torch: TP groups inside pipeline stages


class Backend(StrEnum):
    LLAMACPP = "llama.cpp"
    TORCH = "torch"


class KVType(StrEnum):
    """KV-cache element types both backends' planners know (llama.cpp's ``-ctk``/``-ctv``)."""

    F16 = "f16"
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"


# Architectures whose shapes, KV cache and compute buffers the planner models.
PLANNABLE_ARCHS = frozenset({"llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3",
                             # mixtures of experts (planned with per-layer expert placement, planner/moe.py);
                             # deepseek2's MLA cache is modelled as llama.cpp stores it (one latent + rope key per token)
                             "qwen3moe", "gpt-oss", "glm4moe", "deepseek2"})
# Architectures each backend runs. The torch backend implements the Llama equation, its qwen2 (QKV bias) and
# qwen3 (QK norm) variants, and qwen3moe's, glm4moe's and gpt-oss's routed experts (backends/torch/moe.py); gemma's
# soft-capping and sliding windows, phi3's fused projections and deepseek2 are not there.
# GGUF quant types the torch backend keeps in their blocks on a GPU (backends/torch/quant.py); a matrix of any
# other type (MXFP4, the i-quants) is expanded to the run dtype (bf16) as it loads.
TORCH_BLOCK_TYPES = frozenset({"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"})
BACKEND_ARCHS = {
    Backend.LLAMACPP: PLANNABLE_ARCHS,
    Backend.TORCH: frozenset({"llama", "qwen2", "qwen3", "qwen3moe", "glm4moe", "gpt-oss"}),
}
# Architectures llama.cpp's -sm tensor runs (its tensor-parallel graph is written for these).
LLAMACPP_TENSOR_ARCHS = frozenset({"llama", "qwen2", "qwen3"})


def choices(enum: type[StrEnum], auto: bool = False) -> list[str]:
    """The values a command-line flag or a TUI selector offers, ``auto`` first where the planner may choose."""
    return ([AUTO] if auto else []) + [m.value for m in enum]


def shown(member: StrEnum | None) -> str:
    """A request's choice as the user wrote it: the member's value, or ``auto`` for None."""
    return member.value if member is not None else AUTO


def parse(enum: type[StrEnum], value: str | StrEnum | None) -> StrEnum | None:
    """``value`` as a member of ``enum``; None for ``auto`` (or None). Raises ValueError naming the choices."""
    if value is None or value == AUTO:
        return None
    try:
        return enum(value)
    except ValueError:
        raise ValueError(f"{value!r}: must be one of {', '.join(choices(enum, auto=True))}") from None
