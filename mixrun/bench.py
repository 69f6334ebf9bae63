"""``mixrun bench``: run each planned candidate that fits, measure prefill and decode speed, compare with the
prediction, and say which candidate won.

Method, per candidate: load it, warm up once (same prompt length, a few tokens), then ``repeats`` times feed a
prompt of exactly ``prompt_tokens`` tokens and decode ``tokens`` tokens greedily (temperature 0, no repeat
penalty). Both engines keep the KV cache of the previous turn and prefill only past the common prefix, so every
prompt starts with a different word (a nonce) and the tokens actually prefilled are counted from the prefix the
previous prompt shares (0, or 1 for a BOS token). Prefill tok/s = tokens prefilled / time to the first token;
decode tok/s = (tokens decoded - 1) / time from the first token to the last. The prompt is the start of a story,
which the model continues; it may still stop early at an end-of-generation token (the engines have no
ignore-EOS switch), and then the achieved count is reported.

The figures are medians over the repeats, with the spread (min-max). Ctrl-C keeps what was measured so far.
Recording into a profile is in :mod:`mixrun.bench_record`.
"""

from __future__ import annotations

import io
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixrun.errors import MixrunError

SPLIT_NAMES = ("none", "layer", "row", "tensor", "hybrid")
# Each prompt starts with a different word, so no prompt shares a prefix with the one before.
NONCES = ("Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel", "India", "Juliet", "Kilo",
          "Lima", "Mike", "November", "Oscar", "Papa", "Quebec", "Romeo", "Sierra", "Tango", "Uniform", "Victor",
          "Whiskey", "Xray", "Yankee", "Zulu")
STORY = ("Once upon a time, in a small village by the sea, there lived an old fisherman who told long stories "
         "about the storms he had seen, the friends he had lost, and the strange lights that danced on the water "
         "on the longest night of the year. The children of the village gathered around him every evening. ")
WARMUP_TOKENS = 4


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


# ---- which candidates -------------------------------------------------------------------------------------------


def parse_splits(text: str | None) -> set[str] | None:
    """``--splits layer,tensor`` -> {"layer", "tensor"}; None (all) when not given or ``auto``."""
    if not text or text == "auto":
        return None
    out = {s.strip() for s in text.split(",") if s.strip()}
    bad = sorted(out - set(SPLIT_NAMES))
    if bad or not out:
        raise MixrunError(f"--splits {text}: unknown split {', '.join(bad) or '(empty)'} "
                          f"(known: {', '.join(SPLIT_NAMES)})")
    return out


def _layout_key(c: Any) -> tuple[Any, ...]:
    return (c.backend.value, tuple((g.devices, g.layers, tuple(round(s, 4) for s in g.shares)) for g in c.groups))


def select(report: Any, splits: set[str] | None, backend: str, simulate: bool,
           absent: Callable[[Any], tuple[str, ...]] = lambda c: ()) -> tuple[list[Measured], list[str]]:
    """The candidates to run, one per distinct layout, and notes on what was left out and why.

    ``absent(candidate)`` names the candidate's devices this machine lacks (not asked under ``--simulate``).
    Raises :class:`NothingToBench` when none of the asked-for candidates fits, MixrunError when none can run here.
    """
    notes: list[str] = []
    pool = [c for c in report.candidates if (splits is None or c.split.value in splits)
            and (backend == "auto" or c.backend.value == backend)]
    if not pool:
        what = ", ".join(x for x in (f"split {'/'.join(sorted(splits))}" if splits else "",
                                     f"backend {backend}" if backend != "auto" else "") if x)
        raise NothingToBench(f"{report.profile}: no candidate with {what} (the planner offers: "
                             + "; ".join(f"{c.label} ({c.split.value}, {c.backend.value})" for c in report.candidates)
                             + ")")
    fitting = [c for c in pool if c.fits]
    if not fitting:
        c = min(pool, key=lambda c: sum(d.shortfall_bytes for d in c.devices))
        short = "; ".join(f"{d.id} short by {d.shortfall_bytes / 2**30:.2f} GiB" for d in c.devices if not d.fits)
        hint = f" ({report.suggestions[0].what})" if getattr(report, "suggestions", ()) else ""
        raise NothingToBench(f"{Path(report.model['path']).name}: does not fit {report.profile} at context "
                             f"{report.request.ctx:,}: {c.label}: {short}{hint}")
    for c in pool:
        if not c.fits:
            notes.append(f"{c.label}: does not fit, not run")
    chosen: dict[tuple[Any, ...], Measured] = {}
    for c in fitting:
        if simulate and c.backend.value == "llama.cpp":
            notes.append(f"{c.label}: skipped under --simulate (llama.cpp would run on this machine's CPU, so its "
                         "figure would say nothing about the rig)")
            continue
        missing = () if simulate else absent(c)
        if missing:
            notes.append(f"{c.label}: {', '.join(missing)} not on this machine, not run "
                         "(--simulate runs the torch candidates on CPU processes)")
            continue
        key = _layout_key(c)
        if key in chosen:
            m = chosen[key]
            m.twins += (c,)
            notes.append(f"{c.label}: the same layout as {m.candidate.label}, measured once")
        else:
            chosen[key] = Measured(c)
    if not chosen:
        raise MixrunError(f"{report.profile}: nothing to measure on this machine: " + "; ".join(notes))
    return list(chosen.values()), notes


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


def start_engine(backend: str, **kwargs: Any) -> Any:
    """The engine for one candidate (a seam: tests replace it with a fake engine)."""
    from mixrun.backends.base import start

    return start(backend, **kwargs)


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
    from mixrun.backends.loading import LoadProgress, preflight

    cfg = report.config
    for m in report.results:
        c = m.candidate
        try:
            if not cfg.simulate:
                preflight(profile, c)
            t0 = time.perf_counter()
            step(c.label, "loading")
            llama = c.backend.value == "llama.cpp"
            engine = start_engine(c.backend.value, model=report.model, n_ctx=cfg.ctx, n_threads=cfg.threads,
                                  seed=0, plan=c, profile=profile, simulate=cfg.simulate,
                                  progress=LoadProgress(Path(report.model).name, out=io.StringIO()) if llama else False)
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


# ---- the command ------------------------------------------------------------------------------------------------


def bench_command(model: str, profile_ref: str, cfg: BenchConfig, *, splits: str | None = None,
                  backend: str = "auto", record: bool = False, as_json: bool = False, debug: bool = False) -> int:
    """Plan, measure, print, and with ``record`` write the results into the profile. Exit code: 0, 1 when no
    candidate could be measured, 130 after Ctrl-C (what was measured is still printed and recorded)."""
    import json

    from mixrun.backends.loading import free_memory
    from mixrun.gguf_spec import read_spec
    from mixrun.planner import PlanRequest, plan
    from mixrun.profile import load_profile

    cfg.check()
    if record and cfg.simulate:
        raise MixrunError("--record with --simulate: simulated runs measure CPU processes, not the rig's devices, "
                          "so they are not recorded")
    wanted = parse_splits(splits)
    profile = load_profile(profile_ref)
    spec = read_spec(model)
    if not Path(model).is_file():
        raise MixrunError(f"{model}: bench runs the model, so it needs a local .gguf file")
    report = plan(profile, spec, PlanRequest(ctx=cfg.ctx))
    chosen, notes = select(report, wanted, backend, cfg.simulate, absent=lambda c: free_memory(profile, c).absent)
    rep = BenchReport(model=model, model_bytes=spec.file_bytes, profile=profile.name, config=cfg, results=chosen,
                      notes=notes)
    from mixrun.bench_output import progress_bar, render_report

    with progress_bar(chosen, cfg) as step:
        run_bench(rep, profile, step, debug=debug)
    if record:
        from mixrun import bench_record

        results = bench_record.results_of(rep)
        if results:
            rep.recorded = str(bench_record.record(profile_ref, results))
        else:
            rep.notes.append("nothing was measured, so nothing was recorded")
    if as_json:
        sys.stdout.write(json.dumps(rep.to_json(), indent=2) + "\n")
    else:
        render_report(rep)
    if rep.interrupted:
        print("mixrun: interrupted: kept the figures measured so far", file=sys.stderr)
        return 130
    if rep.winner is None:
        errors = "; ".join(f"{m.candidate.label}: {m.error}" for m in rep.results if m.error)
        print(f"mixrun: no candidate could be measured{': ' + errors if errors else ''}", file=sys.stderr)
        return 1
    return 0
