"""llama.cpp plans for mixtures of experts: dense weights and KV cache on the GPUs, each layer's routed experts on
its GPU or in host RAM, chosen layer by layer so that every GPU keeps the expert share that suits it.

The placement is a llama.cpp ``-sm layer`` split (``-ts``) of every layer onto the GPUs, plus ``-ot REGEX=CPU``
tensor overrides that move the routed experts (``ffn_{up,down,gate,gate_up}_exps``) of chosen layers to host
memory. An override moves a weight only: the layer's other weights and its KV cache stay on the layer's GPU
(docs/llamacpp-placement.md, section 3). Unlike ``--n-cpu-moe N`` (the experts of the first N layers, all taken
from the first GPU's layers), the layers whose experts leave are chosen per GPU, from what each GPU lacks.

Cost, decode at batch 1 (docs/cost-model.md, "Mixtures of experts"): each GPU reads its layers' dense bytes and
``used / count`` of its resident experts at its bandwidth; the host reads ``used / count`` of the experts it holds
at host memory bandwidth (capped by the threads llama.cpp runs); each layer with experts in RAM sends the hidden
state to the host and back. Prefill: llama.cpp's op_offload streams CPU-held experts over PCIe to the first GPU
for ubatches of at least ``OP_OFFLOAD_MIN_BATCH`` tokens; smaller ones run on the CPU.
"""

from __future__ import annotations

import itertools
import math
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mixrun.alloc import allocate
from mixrun.planner.candidates import (
    _device_list,
    _kv_flags,
    _llama_common,
    gpu_subsets,
    ts_for_counts,
)
from mixrun.planner.cost import (
    MOE_LAYER_OVERHEAD_S,
    costs,
    layer_overhead_s,
    read_time_s,
    stage_cost_s,
    transfer_s,
)
from mixrun.planner.evaluate import Context, planned_capacity
from mixrun.planner.memory import F32, GPU_OVERHEAD_BYTES, compute_bytes, output_buffer_bytes
from mixrun.planner.search import shift_descent
from mixrun.planner.types import Candidate, DeviceUse, Group, Timing
from mixrun.rig.profile import Device
from mixrun.units import shortfalls
from mixrun.vocab import Backend, Split

# llama.cpp's names for the routed experts (common/common.h LLM_FFN_EXPS_REGEX, which --cpu-moe and --n-cpu-moe use)
EXPS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
# ggml-cuda's op_offload threshold (ggml-cuda.cu, GGML_OP_OFFLOAD_MIN_BATCH, default 32): a MUL_MAT_ID over at
# least this many tokens whose weights sit in host memory runs on the first GPU, its weights copied over PCIe.
OP_OFFLOAD_MIN_BATCH = 32
# A CPU thread streams at most this many GB/s of expert weights (a desktop core's share of a DDR4/DDR5 channel
# pair); the host reads at min(threads x this, bandwidth x llama.cpp's CPU efficiency). Assumption, see the docs.
CPU_THREAD_GBS = 10.0
# Share of the host's memory bandwidth its threads stream RAM-held experts at during decode (llama.cpp's CPU
# MUL_MAT_ID: small per-expert products gathered per token, a thread barrier per layer), below the 0.6 a dense CPU
# decode reaches. Set from the first published row with the host's bandwidth stated (Qwen3-30B-A3B, i9-10900X,
# 102 GB/s measured: 0.45 explains it, docs/benchmarks.md), then checked on three rows added after it: gpt-oss-20b
# and DeepSeek-Coder-V2-Lite on the same host (x1.10, x1.32) and gpt-oss-120b on a Ryzen 7900 DDR5 host (x1.00).
CPU_EXPERT_BW_EFF = 0.45
# Per layer with experts in RAM: the scheduler's two extra graph splits (GPU -> CPU and back), each a
# synchronisation and a wake-up of the CPU threads, beyond the copies' own link time. An estimate, not a fit: the
# one published row with the host's bandwidth stated (docs/cost-model-data.toml [[moe]]) is 21% slower than
# predicted, which this constant alone would need ~190 us to explain.
CPU_EXPERT_SPLIT_S = 60e-6
DEFAULT_THREADS = 8  # when the profile does not say how many cores the host has
MAX_CLASS_COMBOS = 200_000  # exact choice of evicted layers per GPU up to this many class-count combinations
MAX_SEARCH_SUBSETS = 16  # GPU subsets the MoE search tries (the largest first)


# ---- the -ot regex -----------------------------------------------------------------------------------------------


def _digits_span(lo: str, hi: str) -> list[str]:
    """Regexes for the integers from ``lo`` to ``hi``, both written with the same number of digits."""
    if lo == hi:
        return [lo]
    if len(lo) == 1:
        return [f"[{lo}-{hi}]"]
    if lo[0] == hi[0]:
        return [lo[0] + p for p in _digits_span(lo[1:], hi[1:])]
    n = len(lo) - 1
    out: list[str] = []
    first, last = int(lo[0]), int(hi[0])
    if lo[1:] != "0" * n:
        out += [lo[0] + p for p in _digits_span(lo[1:], "9" * n)]
        first += 1
    tail: list[str] = []
    if hi[1:] != "9" * n:
        tail = [hi[0] + p for p in _digits_span("0" * n, hi[1:])]
        last -= 1
    if first <= last:
        head = str(first) if first == last else f"[{first}-{last}]"
        out.append(head + "[0-9]" * n)
    return out + tail


def int_range_regex(lo: int, hi: int) -> list[str]:
    """Alternatives of a regex matching exactly the decimal integers ``lo..hi`` (inclusive, no leading zeros)."""
    out: list[str] = []
    for d in range(len(str(lo)), len(str(hi)) + 1):
        a, b = max(lo, 10 ** (d - 1) if d > 1 else 0), min(hi, 10**d - 1)
        if a <= b:
            out += _digits_span(str(a), str(b))
    return out


def layer_runs(layers: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted layer indices as half-open runs ``[start, end)``."""
    runs: list[tuple[int, int]] = []
    for i in sorted(set(layers)):
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def experts_override(layers: Iterable[int], buffer: str = "CPU") -> str | None:
    """One ``REGEX=BUFFER`` override (llama-server's ``-ot``) moving the routed experts of ``layers``; None if none.
    The regex is as compact as the runs allow: ``blk\\.(1[0-9]|2[0-3])\\.ffn_(up|down|gate|gate_up)_(ch|)exps``."""
    alts = [p for a, b in layer_runs(layers) for p in int_range_regex(a, b - 1)]
    if not alts:
        return None
    body = alts[0] if len(alts) == 1 else "(" + "|".join(alts) + ")"
    return rf"blk\.{body}{EXPS_REGEX}={buffer}"


def ot_flags(overrides: Sequence[str]) -> str:
    """The overrides as llama-server arguments, quoted for a POSIX shell (as backends' ``server_flags`` writes)."""
    return " ".join(f"-ot {shlex.quote(o)}" for o in overrides)


# ---- per-layer facts ---------------------------------------------------------------------------------------------


def moe_compute_bytes(ctx: Context) -> int:
    """The CPU's compute buffer for the expert FFNs it runs: one ubatch of the routed FFN's intermediates
    (router probabilities, the selected experts' gate/up/activation and their outputs)."""
    spec, ub = ctx.spec, min(ctx.req.ubatch, ctx.req.ctx)
    used = spec.n_expert_used
    return ub * F32 * (2 * spec.n_expert + 3 * used * spec.n_ff_exp + 2 * used * spec.n_embd + spec.n_embd)


# ---- one placement -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoEEvaluation:
    devices: tuple[DeviceUse, ...]
    decode: Timing
    prefill_s: float
    gpu_s: tuple[float, ...]  # decode seconds each GPU reads
    cpu_s: float  # decode seconds the host reads experts
    offload_ubatch: int | None  # the smallest ubatch at which streaming CPU experts to the GPU beats the CPU

    @property
    def fits(self) -> bool:
        return all(d.fits for d in self.devices)

    @property
    def shortfall_bytes(self) -> int:
        return sum(d.shortfall_bytes for d in self.devices)


def host_threads(ctx: Context) -> int:
    """Threads llama.cpp runs on the host: llama-cpp-python's default is half the logical CPUs, about the physical
    cores the profile records."""
    host = ctx.profile.host_of(ctx.host_cpu) if ctx.host_cpu is not None else None
    return (host.cpu_cores if host is not None and host.cpu_cores else None) or DEFAULT_THREADS


def cpu_expert_rate(ctx: Context) -> float:
    """Bytes per second the host streams CPU-resident experts at during decode."""
    cpu = ctx.host_cpu
    if cpu is None:
        return 1.0
    bw = cpu.mem_bandwidth_gbs * 1e9 * CPU_EXPERT_BW_EFF
    return min(bw, host_threads(ctx) * CPU_THREAD_GBS * 1e9)


def _gpu_fixed(ctx: Context, gpus: Sequence[Device], counts: Sequence[int]) -> list[list[int]]:
    """[weights, kv, compute, overhead] per GPU with every expert resident (llama.cpp ``-sm layer``)."""
    facts, req, spec = ctx.facts, ctx.req, ctx.spec
    used = [k for k, n in enumerate(counts) if n]
    rows, start = [], 0
    for k, (dev, n) in enumerate(zip(gpus, counts, strict=True)):
        a, b = start, start + n
        start = b
        last = bool(used) and k == used[-1]
        if not n:
            rows.append([0, 0, 0, 0])
            continue
        w = facts.weights(a, b) + ((facts.output_bytes + facts.misc_bytes) if last else 0)
        kv = facts.kv_bytes(req.ctx, req.ubatch, a, b)
        comp = compute_bytes(spec, ctx=req.ctx, ubatch=req.ubatch, n_layers=n, last=last, flash_attn=req.flash_attn,
                             start=a, kv_type=req.kv_type)
        rows.append([w, kv, comp, GPU_OVERHEAD_BYTES["llama.cpp"] if dev.backend != "cpu" else 0])
    return rows


def evaluate_moe(ctx: Context, gpus: Sequence[Device], counts: Sequence[int], cpu_layers: Iterable[int]
                 ) -> MoEEvaluation:
    """Memory and predicted time of one placement: layers ``counts[k]`` on ``gpus[k]`` in order, and the routed
    experts of ``cpu_layers`` in host memory."""
    p, spec, req, facts = ctx.profile, ctx.spec, ctx.req, ctx.facts
    mf = ctx.facts
    on_cpu = frozenset(cpu_layers)
    cpu = ctx.host_cpu
    rows = _gpu_fixed(ctx, gpus, counts)
    owner: list[int] = [k for k, n in enumerate(counts) for _ in range(n)]
    for i in on_cpu:
        rows[owner[i]][0] -= mf.expert_bytes[i]
    first = next((k for k, n in enumerate(counts) if n), 0)
    if on_cpu:  # op_offload: the first GPU's compute buffer holds a copy of the largest CPU-held expert weight
        rows[first][2] += max(mf.largest_expert_tensor[i] for i in on_cpu)
    devices = [DeviceUse(d.id, *r, capacity_bytes=planned_capacity(d)) for d, r, n in zip(gpus, rows, counts,
                                                                                          strict=True) if n]
    if cpu is not None:
        held = facts.embd_bytes + sum(mf.expert_bytes[i] for i in on_cpu)
        comp = output_buffer_bytes(spec, req.batch) + (moe_compute_bytes(ctx) if on_cpu else 0)
        devices.insert(0, DeviceUse(cpu.id, held, 0, comp, 0, planned_capacity(cpu)))
    # decode
    gpu_s = []
    start = 0
    used = [k for k, n in enumerate(counts) if n]
    for k, (dev, n) in enumerate(zip(gpus, counts, strict=True)):
        a, b = start, start + n
        start = b
        if not n:
            gpu_s.append(0.0)
            continue
        read = sum(spec.layer_decode_bytes[i] - (mf.active_expert_bytes[i] if i in on_cpu else 0)
                   for i in range(a, b))
        if k == used[-1]:
            read += facts.output_bytes + facts.misc_bytes
        gpu_s.append(read_time_s(read, dev, "llama.cpp"))
    cpu_rate = cpu_expert_rate(ctx)
    cpu_s = sum(mf.active_expert_bytes[i] for i in on_cpu) / cpu_rate
    handoff = 0.0
    hidden = spec.n_embd * F32
    routing = spec.n_expert_used * 8  # the selected experts' ids and weights
    if cpu is not None:
        for i in on_cpu:
            g = gpus[owner[i]].id
            handoff += transfer_s(p, g, cpu.id, hidden + routing) + transfer_s(p, cpu.id, g, hidden)
            handoff += CPU_EXPERT_SPLIT_S
        handoff += transfer_s(p, cpu.id, gpus[first].id, hidden) + transfer_s(p, gpus[used[-1]].id, cpu.id,
                                                                           spec.n_vocab * F32)
    c0 = costs("llama.cpp", gpus[first])
    for prev, nxt in itertools.pairwise(used):
        src, dst = gpus[prev].id, gpus[nxt].id
        handoff += transfer_s(p, src, dst, hidden) + stage_cost_s(p, src, dst, "llama.cpp")
    overhead = (layer_overhead_s("llama.cpp", gpus[first], req.llamacpp_build) * spec.n_layers
                + MOE_LAYER_OVERHEAD_S * len(facts.moe_layers) + c0.token_overhead_s)
    decode = Timing(sum(gpu_s) + cpu_s, 0.0, handoff, overhead)
    prefill_s, pays = _prefill(ctx, gpus, counts, owner, on_cpu, first)
    return MoEEvaluation(devices=tuple(devices), decode=decode, prefill_s=prefill_s, gpu_s=tuple(gpu_s),
                         cpu_s=cpu_s, offload_ubatch=pays)


def _prefill(ctx: Context, gpus: Sequence[Device], counts: Sequence[int], owner: list[int], on_cpu: frozenset[int],
             first: int) -> tuple[float, int | None]:
    """Seconds to prefill the request's prompt, and the ubatch from which op_offload beats the CPU (None without
    CPU experts). Overrides turn llama.cpp's pipeline parallelism off, so the GPUs take each ubatch in turn."""
    p, spec, req = ctx.profile, ctx.spec, ctx.req
    mf = ctx.facts
    P = req.prompt_tokens
    n_micro = max(1, math.ceil(P / req.ubatch))
    total, prev = 0.0, None
    for k, dev in enumerate(gpus):
        layers = [i for i, o in enumerate(owner) if o == k]
        if not layers:
            continue
        # as a pipeline stage is costed (evaluate_pipeline), less the RAM experts' FLOPs, which are counted below
        flops, _ = ctx.prompt_flops(layers)
        _, experts = ctx.prompt_flops([i for i in layers if i not in on_cpu])
        flops += 2.0 * P**2 * spec.n_head * spec.head_dim * len(layers)
        total += ctx.prefill_compute_s(flops, len(layers), 1.0, dev, "llama.cpp", experts)
        total += costs("llama.cpp", dev).prefill_fixed_s(len(layers), n_micro)
        if prev is not None:  # the prompt's hidden states cross to the next GPU
            total += transfer_s(p, prev.id, dev.id, P * spec.n_embd * F32)
        prev = dev
    c0 = costs("llama.cpp", gpus[first])
    cpu = ctx.host_cpu
    if not on_cpu or cpu is None:
        return total, None
    held = sum(mf.expert_bytes[i] for i in on_cpu)
    act = sum(mf.active_params[i] - mf.dense_params[i] for i in on_cpu)  # expert parameters per token
    link = p.link(cpu.id, gpus[first].id)
    stream_s = held / (link.bandwidth_gbs * 1e9)  # every CPU-held expert crosses once per ubatch
    gpu_rate = gpus[first].fp16_tflops * 1e12 * c0.prefill_eff
    cpu_rate = cpu.fp16_tflops * 1e12 * costs("llama.cpp", cpu).prefill_eff
    pays = None
    if act and cpu_rate < gpu_rate:
        pays = max(OP_OFFLOAD_MIN_BATCH, math.ceil(stream_s / (2.0 * act * (1 / cpu_rate - 1 / gpu_rate))))
    left = P
    while left > 0:
        u = min(req.ubatch, left)
        left -= u
        if u >= OP_OFFLOAD_MIN_BATCH:
            total += stream_s + 2.0 * act * u / gpu_rate
        else:
            total += 2.0 * act * u / cpu_rate + len(on_cpu) * 2 * CPU_EXPERT_SPLIT_S
    return total, pays


# ---- choosing the layers whose experts leave ----------------------------------------------------------------------


def _evict(ctx: Context, dev: Device, layers: Sequence[int], need: int) -> tuple[list[int], float] | None:
    """The layers of ``layers`` (one GPU's) whose experts go to RAM to free at least ``need`` bytes at the least
    decode time; None when even all of them do not free enough. Layers with the same expert bytes are
    interchangeable, so the choice is how many of each kind: exact over those counts (the highest-numbered layers of
    a kind go first, which keeps the -ot regex short), greedy by time per byte beyond MAX_CLASS_COMBOS."""
    if need <= 0:
        return [], 0.0
    mf = ctx.facts
    cpu = ctx.host_cpu
    if cpu is None:
        return None
    rate_gpu = dev.mem_bandwidth_gbs * 1e9 * costs("llama.cpp", dev).bw_eff
    rate_cpu = cpu_expert_rate(ctx)
    hop = (transfer_s(ctx.profile, dev.id, cpu.id, ctx.spec.n_embd * F32 + ctx.spec.n_expert_used * 8)
           + transfer_s(ctx.profile, cpu.id, dev.id, ctx.spec.n_embd * F32) + CPU_EXPERT_SPLIT_S)
    classes: dict[tuple[int, float], list[int]] = {}
    for i in layers:
        if mf.expert_bytes[i]:
            classes.setdefault((mf.expert_bytes[i], mf.active_expert_bytes[i]), []).append(i)
    if sum(e * len(ls) for (e, _a), ls in classes.items()) < need:
        return None
    keys = list(classes)
    delta = [a * (1 / rate_cpu - 1 / rate_gpu) + hop for _e, a in keys]
    sizes = [len(classes[k]) for k in keys]
    best: tuple[float, tuple[int, ...]] | None = None
    if math.prod(n + 1 for n in sizes) <= MAX_CLASS_COMBOS:
        for combo in itertools.product(*(range(n + 1) for n in sizes)):
            freed = sum(c * k[0] for c, k in zip(combo, keys, strict=True))
            if freed < need:
                continue
            t = sum(c * d for c, d in zip(combo, delta, strict=True))
            if best is None or t < best[0] - 1e-15:
                best = (t, combo)
    else:  # greedy: cheapest time per freed byte first
        order = sorted(range(len(keys)), key=lambda j: delta[j] / keys[j][0])
        combo_l, freed = [0] * len(keys), 0
        for j in order:
            while combo_l[j] < sizes[j] and freed < need:
                combo_l[j] += 1
                freed += keys[j][0]
        best = (sum(c * d for c, d in zip(combo_l, delta, strict=True)), tuple(combo_l))
    assert best is not None
    chosen = [i for c, k in zip(best[1], keys, strict=True) for i in sorted(classes[k])[len(classes[k]) - c:]]
    return sorted(chosen), best[0]


def place_experts(ctx: Context, gpus: Sequence[Device], counts: Sequence[int]) -> frozenset[int] | None:
    """The cheapest set of layers whose experts go to RAM so that every GPU fits with ``counts``; None if no set
    does (a GPU's dense part and KV alone overflow it)."""
    rows = _gpu_fixed(ctx, gpus, counts)
    mf = ctx.facts
    owner = [k for k, n in enumerate(counts) for _ in range(n)]
    first = next((k for k, n in enumerate(counts) if n), 0)
    need = [sum(r) - planned_capacity(d) for d, r in zip(gpus, rows, strict=True)]
    if any(n > 0 for n in need):  # the first GPU then also holds op_offload's copy of the largest CPU expert weight
        need[first] += max((mf.largest_expert_tensor[i] for i in mf.moe_layers), default=0)
    out: list[int] = []
    for k, dev in enumerate(gpus):
        if not counts[k]:
            continue
        got = _evict(ctx, dev, [i for i, o in enumerate(owner) if o == k], need[k])
        if got is None:
            return None
        out += got[0]
    return frozenset(out)


def n_cpu_moe_layers(ctx: Context, gpus: Sequence[Device], counts: Sequence[int]) -> int | None:
    """The smallest ``--n-cpu-moe N`` (experts of layers ``0..N-1`` in RAM) with which every GPU fits, or None."""
    mf = ctx.facts
    for n in range(0, ctx.spec.n_layers + 1):
        ev = evaluate_moe(ctx, gpus, counts, [i for i in range(n) if mf.expert_bytes[i]])
        if all(d.fits for d in ev.devices if d.id != (ctx.host_cpu.id if ctx.host_cpu else None)):
            return n
    return None


# ---- the search ------------------------------------------------------------------------------------------------


def _score(ctx: Context, gpus: Sequence[Device], counts: Sequence[int]
           ) -> tuple[tuple[bool, int, float], frozenset[int], MoEEvaluation]:
    on_cpu = place_experts(ctx, gpus, counts)
    if on_cpu is None:  # nothing fits: every expert in RAM shows how short the dense part is
        on_cpu = frozenset(ctx.facts.moe_layers)
    ev = evaluate_moe(ctx, gpus, counts, on_cpu)
    return (not ev.fits, ev.shortfall_bytes, ev.decode.total_s), on_cpu, ev


def _counts_search(ctx: Context, gpus: Sequence[Device]
                   ) -> tuple[tuple[bool, int, float], tuple[int, ...], frozenset[int], MoEEvaluation]:
    """Layer counts per GPU (llama.cpp's -ts, at least one layer each): starts in proportion to memory and to
    bandwidth, then moves layers between GPUs in shrinking steps while decode gets faster (or closer to fitting)."""
    L = ctx.spec.n_layers
    starts = {tuple(allocate(L, [float(d.capacity_bytes) for d in gpus], minimum=1)),
              tuple(allocate(L, [d.mem_bandwidth_gbs for d in gpus], minimum=1))}
    best = None
    for s in starts:
        sc, on_cpu, ev = _score(ctx, gpus, s)
        if best is None or sc < best[0]:
            best = (sc, s, on_cpu, ev)
    assert best is not None
    if len(gpus) == 1:
        return best
    steps = [max(1, L // 8) >> k for k in range(max(1, L // 8).bit_length())]  # L/8, L/16, ..., 1 layers

    def score(c: list[int]) -> tuple[tuple[bool, int, float], tuple[frozenset[int], MoEEvaluation]]:
        sc, on_cpu, ev = _score(ctx, gpus, c)
        return sc, (on_cpu, ev)

    sc, counts, (on_cpu, ev) = shift_descent(best[1], steps, 1, score)
    return sc, tuple(counts), on_cpu, ev


@dataclass(frozen=True)
class MoEPlacement:
    """The best placement found: layers ``counts[k]`` on ``gpus[k]``, the experts of ``on_cpu`` in host RAM."""

    gpus: tuple[Device, ...]
    counts: tuple[int, ...]
    on_cpu: frozenset[int]
    evaluation: MoEEvaluation


def best_placement(ctx: Context) -> MoEPlacement | None:
    """The GPU subset, ``-ts`` and per-layer expert placement that decode fastest (that fit, else closest to
    fitting); None for a dense model or a rig without GPUs."""
    if not ctx.spec.is_moe or not ctx.gpus:
        return None
    subsets = sorted(gpu_subsets(ctx.gpus, min_size=1), key=len, reverse=True)[:MAX_SEARCH_SUBSETS]
    found = [(_counts_search(ctx, sub), sub) for sub in subsets]
    (_score, counts, on_cpu, ev), gpus = min(found, key=lambda f: f[0][0])
    return MoEPlacement(tuple(gpus), tuple(counts), on_cpu, ev)


def moe_layer(ctx: Context) -> Candidate | None:
    """The llama.cpp MoE candidate (:func:`best_placement` as ``-ts`` and ``-ot`` overrides)."""
    best = best_placement(ctx)
    if best is None:
        return None
    return _candidate(ctx, list(best.gpus), best.counts, best.on_cpu, best.evaluation)


def _candidate(ctx: Context, gpus: list[Device], counts: Sequence[int], on_cpu: frozenset[int],
               ev: MoEEvaluation) -> Candidate:
    spec, req = ctx.spec, ctx.req
    groups, start = [], 0
    for d, n in zip(gpus, counts, strict=True):
        if n:
            groups.append(Group((d.id,), (start, start + n)))
            start += n
    override = experts_override(on_cpu)
    overrides = [override] if override else []
    llama: dict = {"n_gpu_layers": -1, "n_ctx": req.ctx}
    if len(gpus) == 1:
        llama |= {"split_mode": 0}
    else:
        llama |= {"split_mode": 1, "tensor_split": ts_for_counts(gpus, dict(zip([g.id for g in gpus], counts,
                                                                                strict=True)))}
    flag, which = _device_list(ctx, gpus, llama)  # a subset of the GPUs: llama.cpp's device list names them
    if overrides:
        llama["override_tensor"] = overrides
    _llama_common(ctx, llama)
    if len(gpus) == 1:
        server = "-ngl 999 -sm none" + flag
    else:
        server = f"-ngl 999 -sm layer -ts {','.join(map(str, llama['tensor_split']))}{flag}"
    if overrides:
        server += " " + ot_flags(overrides) + f" -t {host_threads(ctx)}"
    n_moe = len(ctx.facts.moe_layers)
    label = (f"llama.cpp MoE, experts of {len(on_cpu)}/{n_moe} layers in RAM ({which})" if on_cpu
             else f"llama.cpp MoE, all experts on GPU ({which})")
    cmd = (f"mixrun chat {spec.source} --profile {ctx.profile.name} --backend llama.cpp --split layer"
           f" --ctx {req.ctx}")
    commands = {"mixrun": cmd,
                "llama_server": f"llama-server -m {spec.source} -c {req.ctx} {server}" + _kv_flags(ctx)}
    return Candidate(split=Split.LAYER, backend=Backend.LLAMACPP, label=label, groups=tuple(groups),
                     devices=ev.devices, decode_tok_s=1.0 / ev.decode.total_s,
                     prefill_tok_s=req.prompt_tokens / ev.prefill_s, decode=ev.decode,
                     why=_why(ctx, gpus, counts, on_cpu, ev), commands=commands, llama_kwargs=llama)


def _why(ctx: Context, gpus: list[Device], counts: Sequence[int], on_cpu: frozenset[int], ev: MoEEvaluation) -> str:
    parts, start = [], 0
    for d, n in zip(gpus, counts, strict=True):
        if not n:
            continue
        mine = [i for i in on_cpu if start <= i < start + n]
        text = f"{d.id} layers {start}-{start + n - 1}"
        if mine:
            text += f", experts of {_runs_text(mine)} in RAM"
        parts.append(text)
        start += n
    text = "; ".join(parts)
    t = ev.decode.total_s
    if on_cpu:
        text += (f"; the host reads {ev.cpu_s / t:.0%} of each token's time at {cpu_expert_rate(ctx) / 1e9:.0f} GB/s "
                 f"({host_threads(ctx)} threads)")
        if ev.offload_ubatch:
            text += f"; prefill streams RAM experts to the GPU (op_offload), paying from ubatch {ev.offload_ubatch}"
        text += "; " + _vs_n_cpu_moe(ctx, gpus, counts, ev)
    if not ev.fits:
        text += "; does not fit: " + shortfalls(ev.devices, ", ")
    return text


def _vs_n_cpu_moe(ctx: Context, gpus: list[Device], counts: Sequence[int], ev: MoEEvaluation) -> str:
    """How the placement differs from llama.cpp's --n-cpu-moe with the same -ts."""
    n = n_cpu_moe_layers(ctx, gpus, counts)
    base = "experts chosen per GPU from what each lacks, where --n-cpu-moe N takes layers 0..N-1 (the first GPU's)"
    if n is None:
        return base + "; no --n-cpu-moe fits with this -ts"
    mf = ctx.facts
    other = evaluate_moe(ctx, gpus, counts, [i for i in range(n) if mf.expert_bytes[i]])
    ratio = other.decode.total_s / ev.decode.total_s
    return base + f"; --n-cpu-moe {n} with this -ts: {1 / other.decode.total_s:.1f} tok/s (this plan x{ratio:.2f})"


def _runs_text(layers: Iterable[int]) -> str:
    return ",".join(f"{a}" if b - a == 1 else f"{a}-{b - 1}" for a, b in layer_runs(layers))
