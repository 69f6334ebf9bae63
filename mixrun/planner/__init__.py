"""The planner: ``plan(profile, spec, request) -> PlanReport``. Pure: no I/O, no torch, no textual, no NVML.

It builds one candidate per split mode (best single device, llama.cpp layer with the default split and with
mixrun's optimized ``-ts``, llama.cpp row, llama.cpp tensor, and mixrun's torch TP x pipeline plan), ranks the
ones that fit by predicted decode speed (or by measured speed where the profile recorded a run of this model and
split), and, when nothing fits, says what would: each suggestion is checked by planning again.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import PurePath

from mixrun.errors import MixrunError
from mixrun.model.spec import ModelSpec, with_tensors
from mixrun.planner import candidates as cands
from mixrun.planner import moe
from mixrun.planner.candidates import SPLIT_MARGIN
from mixrun.planner.cost import correction_for, fit_corrections
from mixrun.planner.evaluate import Context
from mixrun.planner.memory import ModelFacts
from mixrun.planner.types import Candidate, PlanReport, PlanRequest, Suggestion
from mixrun.rig.profile import RigProfile
from mixrun.vocab import Backend, KVType, Split

__all__ = ["PlanRequest", "PlanReport", "Candidate", "Split", "Backend", "KVType", "plan", "PlanError", "spec_at_bpw",
           "scaled_spec"]


class PlanError(MixrunError):
    """The request cannot be planned (bad value, or a model the planner does not understand)."""


def _check(spec: ModelSpec, req: PlanRequest) -> None:
    if not spec.plannable:
        raise PlanError(f"{spec.source}: {spec.not_plannable}")
    if not 16 <= req.ctx <= (1 << 24):
        raise PlanError(f"--ctx {req.ctx}: must be between 16 and 16,777,216 tokens")


def build_candidates(profile: RigProfile, spec: ModelSpec, req: PlanRequest) -> list[Candidate]:
    ctx = Context(profile=profile, spec=spec, req=req, facts=ModelFacts(spec, req.kv_type))
    builders: list[Callable[[], Candidate | None]] = [
        lambda: cands.single_device(ctx),
        lambda: cands.layer_default(ctx),
        lambda: cands.layer_optimized(ctx),
        lambda: cands.best_over_subsets(ctx, cands.row),
        lambda: cands.best_over_subsets(ctx, cands.tensor_llamacpp),
        lambda: cands.torch_plan(ctx),
        lambda: moe.moe_layer(ctx),
    ]
    if req.cpu_offload and ctx.gpus:
        builders.append(lambda: cands.layer_optimized(ctx, offload=True))
    out = [c for c in (b() for b in builders) if c is not None]
    return _apply_measured(profile, spec, out)


def _apply_measured(profile: RigProfile, spec: ModelSpec, out: list[Candidate]) -> list[Candidate]:
    """Use the profile's recorded results (``mixrun bench --record``) in place of predictions.

    A result of this model file, split and backend replaces the candidate's figures. A result that names the file's
    size, or the candidate's label (two llama.cpp layer candidates share a split), applies only when those match too;
    the last matching result wins. Otherwise the rig's correction for this backend on exactly these devices
    (``[[corrections]]``, or fitted now from results that recorded their devices: :func:`cost.fit_corrections`)
    rescales the predicted decode time's two parts, streaming the weights and the fixed per-token costs, and the
    prefill time, for any model; without one for this backend, another backend's correction of the same devices
    does (the same memory and host), and the ``why`` says so. Results recorded before corrections existed (no
    devices) still scale the same layout (backend and label) of other models by measured / predicted."""
    name = PurePath(spec.source).name
    corrections = profile.corrections or tuple(fit_corrections(profile.results))
    done = []
    for c in out:
        hits = [r for r in profile.results if r.model == name and r.split == c.split
                and (r.backend is None or r.backend == c.backend)
                and (r.label is None or r.label == c.label)
                and (r.model_bytes is None or r.model_bytes == spec.file_bytes)]
        used = {d for g in c.groups for d in g.devices}
        corr = correction_for(corrections, c.backend.value, used)
        # the same devices measured under another backend: their bandwidth and host are the same hardware
        other = corr or next((k for k in corrections if tuple(sorted(k.devices)) == tuple(sorted(used))), None)
        scale = [r for r in profile.results if r.model != name and r.backend == c.backend and r.label == c.label
                 and r.predicted_decode_tok_s and not r.devices]
        if hits:
            r = hits[-1]
            c = dataclasses.replace(c, decode_tok_s=r.decode_tok_s, prefill_tok_s=r.prefill_tok_s or c.prefill_tok_s,
                                    measured=True, predicted_decode_tok_s=c.decode_tok_s,
                                    predicted_prefill_tok_s=c.prefill_tok_s,
                                    why=c.why + f"; measured {r.decode_tok_s:g} tok/s"
                                    + (f" on {r.date}" if r.date else ""))
        elif other is not None:
            corr = other
            t = c.decode
            fixed = t.tp_comm_s + t.handoff_s + t.overhead_s
            dec = 1.0 / (corr.read_factor * t.compute_s + corr.fixed_factor * fixed)
            pre = c.prefill_tok_s / (corr.prefill_factor or 1.0)
            models = ", ".join(corr.from_models[:3]) + (" ..." if len(corr.from_models) > 3 else "")
            c = dataclasses.replace(c, decode_tok_s=dec, prefill_tok_s=pre, predicted_decode_tok_s=c.decode_tok_s,
                                    predicted_prefill_tok_s=c.prefill_tok_s,
                                    why=c.why + f"; corrected by this rig's runs of {models} (weights x"
                                    f"{corr.read_factor:.2f}, fixed costs x{corr.fixed_factor:.2f}"
                                    + (f", prefill x{corr.prefill_factor:.2f}" if corr.prefill_factor else "")
                                    + " the time"
                                    + ("" if corr.backend == c.backend else f", measured with {corr.backend.value}")
                                    + ")")
        elif scale:
            r = scale[-1]
            k = r.decode_tok_s / r.predicted_decode_tok_s
            kp = r.prefill_tok_s / r.predicted_prefill_tok_s if r.prefill_tok_s and r.predicted_prefill_tok_s else 1.0
            if abs(k - 1) > 0.05 or abs(kp - 1) > 0.05:
                c = dataclasses.replace(c, decode_tok_s=c.decode_tok_s * k, prefill_tok_s=c.prefill_tok_s * kp,
                                        predicted_decode_tok_s=c.decode_tok_s, predicted_prefill_tok_s=c.prefill_tok_s,
                                        why=c.why + f"; x{k:.2f} as measured on {r.model}"
                                        + (f" ({r.date[:10]})" if r.date else ""))
        done.append(c)
    return done




def _n_devices(c: Candidate) -> int:
    return len({d for g in c.groups for d in g.devices})


def _choose(out: list[Candidate], req: PlanRequest) -> int | None:
    pool = [i for i, c in enumerate(out)
            if (req.split is None or c.split == req.split)
            and (req.backend is None or c.backend == req.backend)
            # current llama.cpp has no row split (cands.ROW_GONE): chosen when asked for, or measured on this rig
            and (c.split != Split.ROW or req.split == Split.ROW or c.measured)]
    if not pool:
        return None
    fitting = [i for i in pool if out[i].fits]
    if fitting and req.split is not None:
        return max(fitting, key=lambda i: (out[i].decode_tok_s, -i))
    if fitting:
        # from the fewest devices up, a plan over more devices replaces the choice only when it is faster by the
        # margin: a predicted gain inside the model's error is no reason to add a card (or to split at all)
        by_n: dict[int, int] = {}
        for i in fitting:
            n = _n_devices(out[i])
            if n not in by_n or (out[i].decode_tok_s, -i) > (out[by_n[n]].decode_tok_s, -by_n[n]):
                by_n[n] = i
        chosen = by_n[min(by_n)]
        for n in sorted(by_n)[1:]:
            if out[by_n[n]].decode_tok_s >= out[chosen].decode_tok_s * (1 + SPLIT_MARGIN):
                chosen = by_n[n]
        more = [i for i in fitting if _n_devices(out[i]) > _n_devices(out[chosen])]
        best = max(more, key=lambda i: (out[i].decode_tok_s, -i)) if more else chosen
        if _n_devices(out[chosen]) == 1 and best != chosen:  # one card: say why splitting loses
            gain = out[best].decode_tok_s / out[chosen].decode_tok_s - 1
            verdict = (f"{-gain:.0%} slower" if gain < 0 else
                       f"only {gain:.0%} faster, under the {SPLIT_MARGIN:.0%} margin")
            out[chosen] = dataclasses.replace(out[chosen], why=out[chosen].why + (
                f"; one card beats splitting: the best split ({out[best].label}, "
                f"{out[best].decode_tok_s:.1f} tok/s) is {verdict}"))
        elif best != chosen:
            gain = out[best].decode_tok_s / out[chosen].decode_tok_s - 1
            verdict = (f"{-gain:.0%} slower" if gain < 0 else
                       f"only {gain:.0%} faster, under the {SPLIT_MARGIN:.0%} margin")
            out[chosen] = dataclasses.replace(out[chosen], why=out[chosen].why + (
                f"; the best plan over more devices ({out[best].label}) is {verdict}"))
        return chosen
    if req.split is not None or req.backend is not None:  # a forced choice is chosen even when it does not fit
        return min(pool, key=lambda i: sum(d.shortfall_bytes for d in out[i].devices))
    return None


def plan(profile: RigProfile, spec: ModelSpec, req: PlanRequest | None = None, *,
         suggest: bool = True) -> PlanReport:
    req = req or PlanRequest()
    _check(spec, req)
    out = build_candidates(profile, spec, req)
    chosen = _choose(out, req)
    if chosen is not None and out[chosen].fits and suggest:
        c = out[chosen]
        out[chosen] = dataclasses.replace(c, why=c.why + _what_cards_add(profile, spec, req, out, c))
    notes = []
    hosts = {d.host for d in profile.devices if d.host}
    if len(hosts) > 1:
        notes.append("llama.cpp candidates use the first host's devices only; the torch plan spans hosts")
    suggestions: tuple[Suggestion, ...] = ()
    if suggest and not any(c.fits for c in out):
        suggestions = tuple(_suggestions(profile, spec, req))
    model = {"path": spec.source, "arch": spec.arch, "n_layers": spec.n_layers, "weights_bytes": spec.total_bytes,
             "kv_bytes_per_token": spec.kv_bytes_per_token(req.kv_type)}
    return PlanReport(model=model, profile=profile.name, request=req, candidates=tuple(out), chosen=chosen,
                      suggestions=suggestions, notes=tuple(notes))


# ---- what each card adds ------------------------------------------------------------------------------------------

LIGHT_SHARE = 0.15  # a GPU holding less than this share of the plan's weights is "lightly used"
MAX_CARD_REPORT_GPUS = 8  # re-planning without each GPU is one plan per GPU; bigger rigs are not reported


def _what_cards_add(profile: RigProfile, spec: ModelSpec, req: PlanRequest, out: list[Candidate],
                    chosen: Candidate) -> str:
    """One clause for the chosen plan's ``why``: for each GPU it leaves out, the best plan that uses it; for each
    it uses lightly, the best plan without it ("why are 3 GPUs slower than 2?")."""
    gpus = [d for d in profile.devices if d.backend != "cpu"]
    if not 1 < len(gpus) <= MAX_CARD_REPORT_GPUS:
        return ""
    used = {d for g in chosen.groups for d in g.devices}
    weights = {u.id: u.weights_bytes for u in chosen.devices}
    total = sum(weights.get(d, 0) for d in used) or 1
    light = min(LIGHT_SHARE, 0.5 / len(used))  # well under an even share: eight GPUs at 1/8 each are not light
    without: dict[tuple, Candidate | None] = {}  # a GPU like one already re-planned without has the same answer
    parts = []
    for d in gpus:
        if d.id not in used:
            others = [c for c in out if c.fits and any(d.id in g.devices for g in c.groups)]
            if others:
                o = max(others, key=lambda c: c.decode_tok_s)
                parts.append(f"{d.id} left out: the best plan using it ({o.label}) is "
                             f"{_relative(o.decode_tok_s, chosen.decode_tok_s)}")
            else:
                parts.append(f"{d.id} left out: no plan using it fits or is faster")
        elif weights.get(d.id, 0) / total < light:
            twin = (d.name, d.host, d.vram_gib, d.mem_bandwidth_gbs, d.fp16_tflops, weights.get(d.id, 0),
                    tuple(sorted((lk.kind, lk.bandwidth_gbs) for lk in (profile.link(d.id, o.id) for o in gpus
                                                                        if o.id != d.id))))
            if twin not in without:
                without[twin] = plan(profile.without(d.id), spec, req, suggest=False).best
            alone = without[twin]
            if alone is None or not alone.fits:
                parts.append(f"{d.id} holds {weights.get(d.id, 0) / total:.0%}: without it nothing fits")
            else:
                parts.append(f"without {d.id}: {alone.decode_tok_s:.1f} tok/s "
                             f"({_relative(alone.decode_tok_s, chosen.decode_tok_s)})")
    return ("; " + "; ".join(parts)) if parts else ""


def _relative(speed: float, chosen: float) -> str:
    ratio = speed / chosen - 1
    return "as fast" if abs(ratio) < 0.005 else f"{abs(ratio):.0%} {'faster' if ratio > 0 else 'slower'}"


# ---- what would make it fit --------------------------------------------------------------------------------------


def _best_fitting(profile: RigProfile, spec: ModelSpec, req: PlanRequest) -> Candidate | None:
    out = build_candidates(profile, spec, req)
    chosen = _choose(out, dataclasses.replace(req, split=None, backend=None))
    return out[chosen] if chosen is not None and out[chosen].fits else None


def _suggestions(profile: RigProfile, spec: ModelSpec, req: PlanRequest) -> list[Suggestion]:
    out: list[Suggestion] = []
    # the largest context that fits (binary search on 256-token steps)
    lo, hi = 0, req.ctx // 256
    best: Candidate | None = None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        c = _best_fitting(profile, spec, dataclasses.replace(req, ctx=mid * 256))
        if c:
            lo, best = mid, c
        else:
            hi = mid - 1
    if best is not None and lo > 0:
        out.append(Suggestion(f"a context of {lo * 256:,} tokens fits ({best.label})", {"ctx": lo * 256},
                              best.decode_tok_s))
    smaller = list(KVType)  # from the largest cache to the smallest
    for kv in smaller[smaller.index(req.kv_type) + 1:]:
        c = _best_fitting(profile, spec, dataclasses.replace(req, kv_type=kv))
        if c:
            out.append(Suggestion(f"a {kv} KV cache fits at {req.ctx:,} tokens ({c.label})", {"kv_type": kv},
                                  c.decode_tok_s))
            break
    if not req.cpu_offload:
        off = _best_fitting(profile, spec, dataclasses.replace(req, cpu_offload=True))
        if off is not None:
            n_cpu = sum(g.n_layers for g in off.groups for d in g.devices if profile.device(d).backend == "cpu")
            out.append(Suggestion(f"offload {n_cpu} layers to the CPU (--offload): "
                                  f"{off.commands.get('llama_server', '')}", {"cpu_offload": True}, off.decode_tok_s))
    out += _moe_suggestions(profile, spec, req)
    bpw = _fitting_bpw(profile, spec, req)
    if bpw is not None:
        out.append(Suggestion(f"a quant of about {bpw:.2f} bits per weight (now {spec.bits_per_weight:.2f}) fits",
                              {"bits_per_weight": round(bpw, 2)}, 0.0))
    return out


def _moe_suggestions(profile: RigProfile, spec: ModelSpec, req: PlanRequest) -> list[Suggestion]:
    """For a mixture of experts: when the GPUs hold the dense part and KV once experts move to host RAM, how many
    layers' experts must move and how much more RAM that takes; when they do not, what the GPUs still lack."""
    ctx = Context(profile=profile, spec=spec, req=req, facts=ModelFacts(spec, req.kv_type))
    best = moe.best_placement(ctx)
    if best is None or best.evaluation.fits:
        return []
    cpu = ctx.host_cpu.id if ctx.host_cpu is not None else None
    host = [u for u in best.evaluation.devices if u.id == cpu and not u.fits]
    gpus_short = sum(u.shortfall_bytes for u in best.evaluation.devices if u.id != cpu)
    gib = 1 << 30
    if host and not gpus_short:
        more = host[0].shortfall_bytes / gib
        return [Suggestion(f"move the experts of {len(best.on_cpu)} of {len(ctx.facts.moe_layers)} layers to host RAM"
                           f" (llama.cpp -ot): needs {more:.1f} GiB more RAM than the profile's {cpu} has",
                           {"host_ram_gib_more": round(more, 1)}, 1.0 / best.evaluation.decode.total_s)]
    if gpus_short and not host:
        return [Suggestion(f"even with every expert in host RAM the GPUs lack {gpus_short / gib:.1f} GiB for the "
                           "dense weights and KV cache", {}, 0.0)]
    return []


def scaled_spec(spec: ModelSpec, factor: float) -> ModelSpec:
    """The same model with its 2-D tensors ``factor`` times as large: a smaller or larger quant of it."""
    return with_tensors(spec, [dataclasses.replace(t, n_bytes=int(t.n_bytes * factor)) if len(t.shape) >= 2 else t
                               for t in spec.tensors])


def spec_at_bpw(spec: ModelSpec, bpw: float) -> ModelSpec:
    """The same model quantized to ``bpw`` bits per weight overall (its 2-D tensors scaled; norms stay F32)."""
    matrix = sum(t.n_bytes for t in spec.tensors if len(t.shape) >= 2)
    rest = spec.total_bytes - matrix
    factor = (bpw * spec.n_params / 8 - rest) / matrix
    return scaled_spec(spec, max(factor, 1e-3))


def _fitting_bpw(profile: RigProfile, spec: ModelSpec, req: PlanRequest) -> float | None:
    """Bits per weight (rounded down to 0.01) of the largest quant of this model that fits, or None."""
    lo, hi = 1.0, spec.bits_per_weight
    if _best_fitting(profile, spec_at_bpw(spec, lo), req) is None:
        return None
    for _ in range(14):
        mid = (lo + hi) / 2
        if _best_fitting(profile, spec_at_bpw(spec, mid), req):
            lo = mid
        else:
            hi = mid
    return math.floor(lo * 100) / 100
