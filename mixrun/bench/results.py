"""What ``mixrun bench`` measures and reports: plain values, no I/O."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from mixrun.errors import MixrunError
from mixrun.vocab import Split, choices

SPLIT_NAMES = tuple(choices(Split))


class NothingToBench(MixrunError):
    """No candidate fits the rig (exit code 3, as for ``mixrun plan``)."""

    exit_code = 3


@dataclass(frozen=True)
class BenchConfig:
    """How to measure: decode ``tokens`` after a prompt of ``prompt_tokens``, ``repeats`` times per candidate."""

    tokens: int = 64
    prompt_tokens: int = 256
    repeats: int = 3
    ctx: int = 4096
    threads: int | None = None
    simulate: bool = False

    def check(self) -> None:
        if self.tokens < 2:
            raise MixrunError(f"--tokens {self.tokens}: must be at least 2 (decode speed needs two tokens)")
        if self.prompt_tokens < 8:
            raise MixrunError(f"--prompt-tokens {self.prompt_tokens}: must be at least 8")
        if not 1 <= self.repeats <= 1000:
            raise MixrunError(f"--repeats {self.repeats}: must be between 1 and 1000")
        if self.prompt_tokens + self.tokens > self.ctx:
            raise MixrunError(f"--prompt-tokens {self.prompt_tokens} + --tokens {self.tokens}: more than the "
                              f"context ({self.ctx}); raise --ctx")


@dataclass(frozen=True)
class Run:
    """One measured generation."""

    prompt_tokens: int  # the prompt's length
    prefilled: int  # tokens actually prefilled (the prompt less the prefix the KV cache already held)
    completion_tokens: int
    prefill_s: float
    decode_s: float
    stop_reason: str

    @property
    def prefill_tok_s(self) -> float:
        return self.prefilled / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        steps = self.completion_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "prefilled": self.prefilled,
                "completion_tokens": self.completion_tokens, "prefill_s": round(self.prefill_s, 4),
                "decode_s": round(self.decode_s, 4), "prefill_tok_s": round(self.prefill_tok_s, 2),
                "decode_tok_s": round(self.decode_tok_s, 2), "stop_reason": self.stop_reason}


@dataclass(frozen=True)
class Spread:
    median: float
    lo: float
    hi: float
    n: int

    @staticmethod
    def of(values: list[float]) -> Spread | None:
        vals = [v for v in values if v > 0]
        return Spread(statistics.median(vals), min(vals), max(vals), len(vals)) if vals else None

    def to_json(self) -> dict[str, Any]:
        return {"median": round(self.median, 2), "min": round(self.lo, 2), "max": round(self.hi, 2), "n": self.n}


@dataclass
class Measured:
    """What one candidate achieved. ``twins``: candidates with the identical layout (not run again)."""

    candidate: Any  # mixrun.planner.Candidate
    twins: tuple[Any, ...] = ()
    runs: list[Run] = field(default_factory=list)
    status: str = "pending"  # pending | done | failed | interrupted
    error: str = ""
    load_s: float = 0.0

    @property
    def decode(self) -> Spread | None:
        return Spread.of([r.decode_tok_s for r in self.runs])

    @property
    def prefill(self) -> Spread | None:
        return Spread.of([r.prefill_tok_s for r in self.runs])

    def ratio(self) -> float | None:
        """Measured decode over predicted decode."""
        d = self.decode
        return d.median / self.candidate.decode_tok_s if d and self.candidate.decode_tok_s > 0 else None

    def to_json(self) -> dict[str, Any]:
        c = self.candidate
        d, p, r = self.decode, self.prefill, self.ratio()
        return {"label": c.label, "split": c.split.value, "backend": c.backend.value, "same_as": [t.label for t in self.twins],
                "status": self.status, "error": self.error or None, "load_s": round(self.load_s, 2),
                "predicted": {"decode_tok_s": round(c.decode_tok_s, 2), "prefill_tok_s": round(c.prefill_tok_s, 1),
                              "measured_before": c.measured},
                "decode_tok_s": d.to_json() if d else None, "prefill_tok_s": p.to_json() if p else None,
                "measured_over_predicted": round(r, 3) if r else None, "runs": [x.to_json() for x in self.runs]}


@dataclass
class BenchReport:
    model: str
    model_bytes: int
    profile: str
    config: BenchConfig
    results: list[Measured]
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False
    recorded: str | None = None

    @property
    def winner(self) -> Measured | None:
        """The candidate with the fastest median decode (the planner ranks by decode speed too)."""
        done = [m for m in self.results if m.decode is not None]
        return max(done, key=lambda m: m.decode.median) if done else None  # type: ignore[union-attr]

    def to_json(self) -> dict[str, Any]:
        w = self.winner
        cfg = self.config
        return {"model": self.model, "model_bytes": self.model_bytes, "profile": self.profile,
                "config": {"tokens": cfg.tokens, "prompt_tokens": cfg.prompt_tokens, "repeats": cfg.repeats,
                           "ctx": cfg.ctx, "threads": cfg.threads, "simulate": cfg.simulate},
                "candidates": [m.to_json() for m in self.results], "winner": w.candidate.label if w else None,
                "interrupted": self.interrupted, "recorded": self.recorded, "notes": self.notes}
