"""The backend protocol: an Engine streams tokens with timing; sampling settings and per-answer figures.

Engines are started by :func:`mixrun.run.launch`, which finds them through a static name table and imports their
heavy dependencies (llama_cpp, torch) only then.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from mixrun.backends.template import ChatTemplate
    from mixrun.planner.types import Candidate
    from mixrun.telemetry import Snapshot


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
    plan: Candidate | None = None  # the planner's candidate this engine runs, when it was planned


class Engine(Protocol):
    info: EngineInfo
    template: ChatTemplate  # the same sandboxed rendering for every backend

    def tokenize(self, text: str) -> list[int]: ...

    def count_tokens(self, text: str) -> int: ...

    def generate(self, prompt: str, sampling: Sampling, stats: Stats) -> Iterator[str]:
        """Yield text pieces as they are produced; fill ``stats`` as it goes."""
        ...

    def telemetry(self) -> Snapshot:
        """What the engine and its devices are doing now."""
        ...

    def close(self) -> None: ...
