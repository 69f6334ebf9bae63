"""Measuring one candidate: exact-length prompts that share no prefix, a warm-up, then timed repeats."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mixrun.bench.results import BenchConfig, BenchReport, Measured, Run
from mixrun.errors import MixrunError

if TYPE_CHECKING:
    from mixrun.backends.base import Engine
    from mixrun.planner.types import Candidate
    from mixrun.rig.profile import RigProfile
    from mixrun.run import LaunchOptions

# Each prompt starts with a different word, so no prompt shares a prefix with the one before.
NONCES = ("Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel", "India", "Juliet", "Kilo",
          "Lima", "Mike", "November", "Oscar", "Papa", "Quebec", "Romeo", "Sierra", "Tango", "Uniform", "Victor",
          "Whiskey", "Xray", "Yankee", "Zulu")
STORY = ("Once upon a time, in a small village by the sea, there lived an old fisherman who told long stories "
         "about the storms he had seen, the friends he had lost, and the strange lights that danced on the water "
         "on the longest night of the year. The children of the village gathered around him every evening. ")
WARMUP_TOKENS = 4


# ---- prompts ----------------------------------------------------------------------------------------------------


def tokenizer_of(engine: Any) -> Callable[[str], list[int]]:
    """The engine's own tokenizer (llama.cpp: ``tokenize``; torch: ``vocab.tokenize``)."""
    fn = getattr(engine, "tokenize", None) or getattr(getattr(engine, "vocab", None), "tokenize", None)
    if fn is None:
        raise MixrunError(f"{type(engine).__name__}: the engine exposes no tokenizer to build a fixed-length prompt")
    return fn


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def build_prompt(tokenize: Callable[[str], list[int]], n_tokens: int, nonce: str) -> tuple[str, list[int]]:
    """A prompt of ``n_tokens`` tokens (as close as words allow, never more): the nonce, then the story repeated.

    Binary search over the number of words, then pad with single-token words up to the length."""
    words = (STORY * (n_tokens // 20 + 2)).split()

    def text(k: int) -> str:
        return f"{nonce}. " + " ".join(words[:k])

    lo, hi = 0, len(words)
    while lo < hi:  # the most words whose tokens fit
        mid = (lo + hi + 1) // 2
        if len(tokenize(text(mid))) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    out = text(lo)
    ids = tokenize(out)
    for _ in range(8):  # word boundaries can leave it a few tokens short
        if len(ids) >= n_tokens:
            break
        longer = tokenize(out + " and")
        if len(longer) > n_tokens:
            break
        out, ids = out + " and", longer
    return out, ids


# ---- measuring --------------------------------------------------------------------------------------------------


def start_engine(model: str, candidate: Candidate, profile: RigProfile, options: LaunchOptions) -> Engine:
    """The engine for one candidate (a seam: tests replace it with a fake engine)."""
    from mixrun.run import launch

    return launch(model, candidate, profile, options)


class _Feeder:
    """Hands out prompts that share no prefix with the one fed before, and counts what each really prefills."""

    def __init__(self, tokenize: Callable[[str], list[int]], n_tokens: int) -> None:
        self.tokenize, self.n_tokens = tokenize, n_tokens
        self.prev: list[int] = []
        self.i = 0

    def next(self) -> tuple[str, int]:
        """(prompt text, tokens it will prefill)."""
        best: tuple[str, list[int], int] | None = None
        for _ in range(len(NONCES)):
            nonce = NONCES[self.i % len(NONCES)]
            self.i += 1
            text, ids = build_prompt(self.tokenize, self.n_tokens, nonce)
            shared = common_prefix(self.prev, ids)
            if best is None or shared < best[2]:
                best = (text, ids, shared)
            if shared <= 1:  # nothing, or a BOS token
                break
        assert best is not None
        self.prev = best[1]
        return best[0], len(best[1]) - best[2]


def measure(engine: Any, cfg: BenchConfig, m: Measured, step: Callable[[str], None]) -> None:
    """Warm up, then ``cfg.repeats`` runs into ``m.runs`` (kept as they finish, so Ctrl-C loses only the current)."""
    from mixrun.backends.base import Sampling, Stats

    feeder = _Feeder(tokenizer_of(engine), cfg.prompt_tokens)

    def one(max_tokens: int) -> Run:
        text, prefilled = feeder.next()
        stats = Stats()
        sampling = Sampling(temperature=0.0, repeat_penalty=1.0, seed=0, max_tokens=max_tokens)
        for _piece in engine.generate(text, sampling, stats):
            pass
        return Run(stats.prompt_tokens, min(prefilled, stats.prompt_tokens), stats.completion_tokens,
                   stats.prefill_s, stats.decode_s, stats.stop_reason)

    one(min(WARMUP_TOKENS, cfg.tokens))
    step("warm-up")
    for i in range(cfg.repeats):
        m.runs.append(one(cfg.tokens))
        step(f"run {i + 1}/{cfg.repeats}")


def run_bench(report: BenchReport, profile: Any, step: Callable[[str, str], None],
              debug: bool = False) -> BenchReport:
    """Measure each selected candidate in turn. Ctrl-C stops and keeps what finished; a candidate that fails to
    start or run is marked failed and the others still run."""
    from mixrun.run import LaunchOptions

    cfg = report.config
    opts = LaunchOptions(n_ctx=cfg.ctx, n_threads=cfg.threads, seed=0, simulate=cfg.simulate, show_progress=False)
    for m in report.results:
        c = m.candidate
        try:
            t0 = time.perf_counter()
            step(c.label, "loading")
            engine = start_engine(report.model, c, profile, opts)
            m.load_s = time.perf_counter() - t0
            try:
                step(c.label, "loaded")
                measure(engine, cfg, m, lambda what, label=c.label: step(label, what))
            finally:
                engine.close()
            m.status = "done"
        except KeyboardInterrupt:
            m.status = "interrupted"
            report.interrupted = True
            break
        except Exception as e:  # noqa: BLE001  (one failing candidate must not lose the others' figures)
            if debug:
                raise
            m.status = "failed"
            m.error = str(e) if isinstance(e, MixrunError) else f"{type(e).__name__}: {e}"
    for m in report.results:
        short = [r for r in m.runs if r.completion_tokens < cfg.tokens]
        if short:
            got = ", ".join(str(r.completion_tokens) for r in short)
            report.notes.append(f"{m.candidate.label}: stopped before {cfg.tokens} tokens in {len(short)} of "
                                f"{len(m.runs)} runs ({got} tokens: {short[0].stop_reason}); decode tok/s counts "
                                "the tokens achieved")
    return report
