"""The backend protocol: ``start(...) -> Engine``; an Engine streams tokens with timing.

Backends register by name and import their heavy dependencies (llama_cpp, torch) only when started.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; ``temperature == 0`` is greedy and deterministic."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    seed: int | None = None
    max_tokens: int = 512
    stop: tuple[str, ...] = ()


@dataclass
class Stats:
    """One generation's figures: token counts and seconds."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stop_reason: str = ""

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first completion token comes out of the prefill; the rest are decode steps
        steps = self.completion_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "prefill_s": round(self.prefill_s, 4), "decode_s": round(self.decode_s, 4),
                "prefill_tok_s": round(self.prefill_tok_s, 2), "decode_tok_s": round(self.decode_tok_s, 2),
                "stop_reason": self.stop_reason}


@dataclass
class EngineInfo:
    backend: str
    model: str
    n_ctx: int
    notes: list[str] = field(default_factory=list)
    plan: Any = None  # the mixrun.planner Candidate this engine runs, when it was planned


class Engine(Protocol):
    info: EngineInfo
    template: Any  # mixrun.chat.ChatTemplate: the same sandboxed rendering for every backend

    def count_tokens(self, text: str) -> int: ...

    def generate(self, prompt: str, sampling: Sampling, stats: Stats) -> Iterator[str]:
        """Yield text pieces as they are produced; fill ``stats`` as it goes."""
        ...

    def telemetry(self) -> Any:
        """A :class:`mixrun.telemetry.Snapshot` of what the engine and its devices are doing now."""
        ...

    def close(self) -> None: ...


BACKENDS: dict[str, Callable[..., Engine]] = {}


def register(name: str) -> Callable[[Callable[..., Engine]], Callable[..., Engine]]:
    def deco(fn: Callable[..., Engine]) -> Callable[..., Engine]:
        BACKENDS[name] = fn
        return fn

    return deco


def start(backend: str, **kwargs: Any) -> Engine:
    if backend == "torch":
        from mixrun.backends.torch import engine  # noqa: F401  (registers itself)
    else:
        from mixrun.backends import llamacpp  # noqa: F401  (registers itself)

    if backend not in BACKENDS:
        from mixrun.errors import MixrunError

        raise MixrunError(f"{backend}: unknown backend (known: {', '.join(sorted(BACKENDS))})")
    return BACKENDS[backend](**kwargs)
