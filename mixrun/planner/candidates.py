"""One small builder per split mode. Each returns a Candidate (or None when the split cannot apply) with its
memory, predicted speed, a one-line why, and the commands that reproduce it."""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence

from mixrun.alloc import allocate, shares_of
from mixrun.model.spec import ModelSpec, with_tensors
from mixrun.planner.cost import QUANT_KERNEL_EFF, allreduce_s, costs, quant_kernel_bytes, read_time_s, transfer_s
from mixrun.planner.evaluate import Context, Evaluation, evaluate_pipeline, evaluate_row, planned_capacity
from mixrun.planner.memory import F32, GPU_OVERHEAD_BYTES, ModelFacts, compute_bytes
from mixrun.planner.search import StageCosts, Unit, best_layout, exact_boundaries, kv_head_counts, tp_cliques
from mixrun.planner.types import Candidate, Group
from mixrun.rig.profile import Device
from mixrun.units import shortfalls
from mixrun.vocab import BACKEND_ARCHS, LLAMACPP_TENSOR_ARCHS, Backend, KVType, Split

GGML_TYPE = {KVType.F16: 1, KVType.Q4_0: 2, KVType.Q8_0: 8}  # llama.cpp's -ctk/-ctv element types (ggml_type)
MAX_UNITS = 12  # Held-Karp is exponential in the units considered; beyond this only the fastest are kept


def llamacpp_layer_map(n_layers: int, ratios: Sequence[float]) -> list[int]:
    """Which device index llama.cpp gives each of the ``n_layers + 1`` offloaded layers (the last is the output),
    from ``-ts`` ratios, exactly as ``llama_model::load_tensors`` does: cumulative normalised ratios, and layer
    ``il`` goes to the first device whose cumulative share exceeds ``il / (n_layers + 1)``."""
    total = sum(ratios)
    cum, s = [], 0.0
    for r in ratios:
        s += r
        cum.append(s / total)
    act = n_layers + 1
    return [min(bisect.bisect_right(cum, il / act), len(ratios) - 1) for il in range(act)]


def ts_for_counts(gpus: Sequence[Device], counts: dict[str, int], output_on_gpu: bool = True) -> list[int]:
    """``-ts`` values that make llama.cpp reproduce per-GPU layer counts: when every layer is offloaded the
    output layer counts as one more layer on the last GPU used."""
    used = [g.id for g in gpus if counts.get(g.id)]
    extra = 1 if output_on_gpu else 0
    return [counts.get(g.id, 0) + (extra if used and g.id == used[-1] else 0) for g in gpus]


def _cuda_index(ctx: Context, dev: str) -> int:
    return [g.id for g in ctx.gpus].index(dev)


def _kv_flags(ctx: Context) -> str:
    kv = ctx.req.kv_type
    return f" -ctk {kv} -ctv {kv}" if kv != "f16" else ""


def _finish(ctx: Context, split: Split, backend: Backend, label: str, groups: list[Group], ev: Evaluation,
            llama: dict | None = None, server: str | None = None) -> Candidate:
    model = ctx.spec.source
    decode = ev.decode.total_s
    cmd = (f"mixrun chat {model} --profile {ctx.profile.name} --backend {backend.value} --split {split.value}"
           f" --ctx {ctx.req.ctx}")
    commands = {"mixrun": cmd}
    if server:
        commands["llama_server"] = f"llama-server -m {model} -c {ctx.req.ctx} {server}" + _kv_flags(ctx)
    return Candidate(split=split, backend=backend, label=label, groups=tuple(groups), devices=ev.devices,
                     decode_tok_s=1.0 / decode, prefill_tok_s=ctx.req.prompt_tokens / ev.prefill_s, decode=ev.decode,
                     why=_why(ctx, groups, ev, split, backend), commands=commands, llama_kwargs=llama or {})


def _slowest_link(ctx: Context, devices: Sequence[str]) -> str:
    links = [ctx.profile.link(a, b) for i, a in enumerate(devices) for b in devices[i + 1:]]
    worst = min(links, key=lambda lk: lk.bandwidth_gbs)
    return f"{worst.kind} {worst.bandwidth_gbs:g} GB/s"


def _why(ctx: Context, groups: list[Group], ev: Evaluation, split: Split, backend: Backend) -> str:
    parts = []
    for g in groups:
        span = f"layers {g.layers[0]}-{g.layers[1] - 1}"
        if split == Split.ROW:
            parts.append(f"every matrix split over {'+'.join(g.devices)} (slowest link {_slowest_link(ctx, g.devices)})"
                         ", KV cache on the main GPU")
        elif g.tp > 1:
            parts.append(f"TP {g.tp} on {'+'.join(g.devices)} (slowest link {_slowest_link(ctx, g.devices)}) {span}")
        else:
            parts.append(f"{g.devices[0]} {span}")
    text = "; ".join(parts)
    if len(ev.stage_s) > 1:
        worst = max(range(len(groups)), key=lambda i: ev.stage_s[i])
        share = ev.stage_s[worst] / ev.decode.total_s
        text += f"; {'+'.join(groups[worst].devices)} takes {share:.0%} of each token"
    t = ev.decode
    if t.tp_comm_s + t.handoff_s > 0.15 * t.total_s:
        text += f"; communication {(t.tp_comm_s + t.handoff_s) / t.total_s:.0%}"
    gpus = any(ctx.profile.device(d).backend != "cpu" for g in groups for d in g.devices)
    if backend == Backend.TORCH and gpus and any(ctx.facts.layer_quant_bytes):
        text += (f"; quantized matrices stream through fused Triton kernels, assumed at {QUANT_KERNEL_EFF:.0%} of the "
                 f"dense rate until measured on a GPU")
    if not ev.fits:
        text += "; does not fit: " + shortfalls(ev.devices, ", ")
    return text


# ---- none ---------------------------------------------------------------------------------------------------------


def single_device(ctx: Context) -> Candidate | None:
    """The best one device: fastest that fits, else the one closest to fitting. The CPU host counts only on a
    rig without GPUs (on others it enters through ``--offload``)."""
    options = []
    for dev in list(ctx.gpus) or ([ctx.host_cpu] if ctx.host_cpu else []):
        groups = [Group((dev.id,), (0, ctx.spec.n_layers))]
        ev = evaluate_pipeline(ctx, "llama.cpp", groups)
        options.append((not ev.fits, sum(d.shortfall_bytes for d in ev.devices), ev.decode.total_s, dev, groups, ev))
    if not options:
        return None
    _nf, _short, _t, dev, groups, ev = min(options, key=lambda o: o[:3])
    if dev.backend == "cpu":
        llama = {"n_gpu_layers": 0, "n_ctx": ctx.req.ctx}
        server, label = "-ngl 0", "llama.cpp, CPU only"
    else:
        i = _cuda_index(ctx, dev.id)
        llama = {"n_gpu_layers": -1, "split_mode": 0, "main_gpu": i, "n_ctx": ctx.req.ctx}
        server, label = f"-ngl 999 -sm none -mg {i}", f"llama.cpp, one GPU ({dev.id})"
    _llama_common(ctx, llama)
    return _finish(ctx, Split.NONE, Backend.LLAMACPP, label, groups, ev, llama, server)


def _llama_common(ctx: Context, llama: dict) -> None:
    llama["flash_attn"] = ctx.req.flash_attn
    if ctx.req.kv_type != KVType.F16:
        llama["type_k"] = llama["type_v"] = GGML_TYPE[ctx.req.kv_type]


# ---- layer --------------------------------------------------------------------------------------------------------


def _groups_from_map(ctx: Context, mapping: list[int], devices: Sequence[Device]) -> list[Group]:
    groups: list[Group] = []
    start = 0
    L = ctx.spec.n_layers
    for il in range(1, L + 1):
        if il == L or mapping[il] != mapping[start]:
            groups.append(Group((devices[mapping[start]].id,), (start, il)))
            start = il
    return groups


def layer_default(ctx: Context) -> Candidate | None:
    """llama.cpp's default ``-sm layer``: layers in proportion to each GPU's free memory."""
    if len(ctx.gpus) < 2:
        return None
    ratios = [d.capacity_bytes for d in ctx.gpus]
    groups = _groups_from_map(ctx, llamacpp_layer_map(ctx.spec.n_layers, ratios), ctx.gpus)
    ev = evaluate_pipeline(ctx, "llama.cpp", groups)
    llama = {"n_gpu_layers": -1, "split_mode": 1, "n_ctx": ctx.req.ctx}
    _llama_common(ctx, llama)
    return _finish(ctx, Split.LAYER, Backend.LLAMACPP, "llama.cpp layer, default split (by free memory)",
                   groups, ev, llama, "-ngl 999 -sm layer")


def layer_optimized(ctx: Context, offload: bool = False) -> Candidate | None:
    """``-sm layer`` with mixrun's ``-ts``: the device subset, order and layer counts that minimise decode time.
    With ``offload`` the CPU may take the first layers (llama.cpp runs the layers it does not offload there)."""
    units = [Unit((d.id,)) for d in ctx.gpus]
    first_only: frozenset[int] = frozenset()
    if offload and ctx.host_cpu is not None:
        units.append(Unit((ctx.host_cpu.id,)))
        first_only = frozenset({len(units) - 1})
    if len(ctx.gpus) < 2 and not (offload and ctx.gpus):
        return None
    groups = _search(ctx, "llama.cpp", units, first_only=first_only)
    fallback = groups is None
    if groups is None:  # nothing fits: show the memory-proportional layout and its shortfalls
        ratios = [d.capacity_bytes for d in ctx.gpus]
        groups = _groups_from_map(ctx, llamacpp_layer_map(ctx.spec.n_layers, ratios), ctx.gpus)
    ev = evaluate_pipeline(ctx, "llama.cpp", groups)
    counts = {g.devices[0]: g.n_layers for g in groups}
    cpu_layers = counts.pop(ctx.host_cpu.id, 0) if ctx.host_cpu else 0
    ts = ts_for_counts(ctx.gpus, counts, output_on_gpu=cpu_layers == 0)
    ngl = ctx.spec.n_layers - cpu_layers
    llama = {"n_gpu_layers": -1 if cpu_layers == 0 else ngl, "split_mode": 1, "tensor_split": ts,
             "n_ctx": ctx.req.ctx}
    _llama_common(ctx, llama)
    server = f"-ngl {999 if cpu_layers == 0 else ngl} -sm layer -ts {','.join(map(str, ts))}"
    label = "llama.cpp layer, optimized -ts" + (" (no layout fits)" if fallback else "")
    if cpu_layers:
        label = f"llama.cpp layer, {cpu_layers} layers offloaded to the CPU"
    return _finish(ctx, Split.LAYER, Backend.LLAMACPP, label, groups, ev, llama, server)


# ---- row and tensor -----------------------------------------------------------------------------------------------


def row(ctx: Context) -> Candidate | None:
    if len(ctx.gpus) < 2:
        return None
    gpus = list(ctx.gpus)
    ratios = [float(d.capacity_bytes) for d in gpus]
    main = max(gpus, key=lambda d: (d.capacity_bytes, -gpus.index(d))).id
    ev = evaluate_row(ctx, gpus, ratios, main)
    groups = [Group(tuple(d.id for d in gpus), (0, ctx.spec.n_layers), tuple(r / sum(ratios) for r in ratios))]
    mg = _cuda_index(ctx, main)
    llama = {"n_gpu_layers": -1, "split_mode": 2, "main_gpu": mg, "n_ctx": ctx.req.ctx}
    _llama_common(ctx, llama)
    return _finish(ctx, Split.ROW, Backend.LLAMACPP, "llama.cpp row (matrices split, KV on the main GPU)",
                   groups, ev, llama, f"-ngl 999 -sm row -mg {mg}")


def tensor_llamacpp(ctx: Context) -> Candidate | None:
    """llama.cpp ``-sm tensor``: needs flash attention, an f16 KV cache, and a supported architecture."""
    if len(ctx.gpus) < 2 or ctx.spec.arch not in LLAMACPP_TENSOR_ARCHS:
        return None
    if not ctx.req.flash_attn or ctx.req.kv_type != KVType.F16:
        return None
    gpus = list(ctx.gpus)
    kv_heads = _tensor_heads(ctx, gpus)
    if kv_heads is None:
        return None
    groups = [Group(tuple(d.id for d in gpus), (0, ctx.spec.n_layers), kv_heads=kv_heads)]
    ev = evaluate_pipeline(ctx, "llama.cpp", groups, split_output=True)
    ts = list(kv_heads)
    llama = {"n_gpu_layers": -1, "split_mode": 3, "tensor_split": ts, "n_ctx": ctx.req.ctx, "flash_attn": True}
    return _finish(ctx, Split.TENSOR, Backend.LLAMACPP, "llama.cpp tensor parallel (all GPUs)", groups, ev,
                   llama, f"-ngl 999 -sm tensor -ts {','.join(map(str, ts))} -fa on")


def _tensor_heads(ctx: Context, gpus: list[Device]) -> tuple[int, ...] | None:
    """Whole KV heads per GPU for ``-sm tensor``: the split that reads fastest among those that fit (every split
    when there are few), else the one proportional to bandwidth."""
    n, heads = len(gpus), ctx.spec.n_head_kv
    if heads < n:
        return None
    if math.comb(heads - 1, n - 1) > 5000:
        return kv_head_counts([d.mem_bandwidth_gbs for d in gpus], heads, even=False)
    facts, req = ctx.facts, ctx.req
    weights = ctx.spec.total_bytes - facts.embd_bytes
    kv = facts.kv_bytes(req.ctx, req.ubatch, 0, ctx.spec.n_layers)
    best: tuple[float, tuple[int, ...]] | None = None
    for cuts in itertools.combinations(range(1, heads), n - 1):
        counts = tuple(b - a for a, b in zip((0, *cuts), (*cuts, heads), strict=True))
        shares = shares_of(counts)
        fits = all(s * (weights + kv) + GPU_OVERHEAD_BYTES["llama.cpp"] <= d.capacity_bytes * 0.97
                   for d, s in zip(gpus, shares, strict=True))
        t = max(s / d.mem_bandwidth_gbs for d, s in zip(gpus, shares, strict=True))
        if fits and (best is None or t < best[0]):
            best = (t, counts)
    return best[1] if best else kv_head_counts([d.mem_bandwidth_gbs for d in gpus], heads, even=False)


# ---- torch: TP groups inside pipeline stages ----------------------------------------------------------------------


def float32_spec(spec: ModelSpec) -> ModelSpec:
    """The model as CPU ranks of the torch backend hold it: every tensor in float32."""
    return with_tensors(spec, [dataclasses.replace(t, qtype="F32", n_bytes=F32 * t.n_elements) for t in spec.tensors])


def torch_units(ctx: Context) -> list[Unit]:
    """TP groups from NVLink cliques (uneven shares by bandwidth, whole KV-head groups), their halves, and every
    GPU alone; CPU processes only when the rig has no GPU."""
    units: list[Unit] = []
    seen: set[tuple[str, ...]] = set()
    for clique in tp_cliques(ctx.profile, ctx.req.tp_min_link_gbs):
        options = [clique]
        if len(clique) >= 4:
            half = len(clique) // 2
            options += [clique[:half], clique[half:]]
        for devs in options:
            bws = [ctx.profile.device(d).mem_bandwidth_gbs for d in devs]
            kv_heads = kv_head_counts(bws, ctx.spec.n_head_kv, even=False)
            if kv_heads and devs not in seen:
                units.append(Unit(devs, kv_heads))
                seen.add(devs)
    gpus = ctx.all_gpus or tuple(d for d in ctx.profile.devices if d.backend == "cpu")[:1]
    units += [Unit((d.id,)) for d in gpus]
    return units


def _torch_shape(split: Split | None) -> Callable[[list[Unit]], bool] | None:
    """Which layouts a forced ``--split`` admits for the torch backend (None: any)."""
    match split:
        case Split.HYBRID:
            return lambda us: len(us) > 1 and any(len(u.devices) > 1 for u in us)
        case Split.TENSOR:
            return lambda us: len(us) == 1 and len(us[0].devices) > 1
        case Split.LAYER:
            return lambda us: len(us) > 1 and all(len(u.devices) == 1 for u in us)
        case Split.NONE:
            return lambda us: len(us) == 1 and len(us[0].devices) == 1
    return None


def torch_plan(ctx: Context) -> Candidate | None:
    if ctx.spec.arch not in BACKEND_ARCHS[Backend.TORCH]:
        return None  # the torch backend does not run this architecture
    units = torch_units(ctx)
    if not units:
        return None
    if all(ctx.profile.device(d).backend == "cpu" for u in units for d in u.devices):
        # CPU ranks dequantize the weights once, to float32: that is what they hold and stream
        ctx = dataclasses.replace(ctx, facts=ModelFacts(float32_spec(ctx.spec), ctx.req.kv_type))
    shape = _torch_shape(ctx.req.split)
    groups = _search(ctx, "torch", units, shape=shape)
    if groups is None:  # nothing fits: every TP clique and lone GPU, layers in proportion to memory
        taken: set[str] = set()
        stages = []
        for u in units:
            if not taken & set(u.devices):
                stages.append(u)
                taken |= set(u.devices)
        caps = [sum(ctx.profile.device(d).capacity_bytes for d in u.devices) for u in stages]
        stages = stages[: ctx.spec.n_layers]
        counts = allocate(ctx.spec.n_layers, caps[: len(stages)], minimum=1)
        bounds = [0]
        for c in counts:
            bounds.append(bounds[-1] + c)
        groups = [Group(u.devices, (bounds[k], bounds[k + 1]), kv_heads=u.kv_heads) for k, u in enumerate(stages)]
    ev = evaluate_pipeline(ctx, "torch", groups)
    if len(groups) == 1:
        split = Split.TENSOR if groups[0].tp > 1 else Split.NONE
    else:
        split = Split.HYBRID if any(g.tp > 1 for g in groups) else Split.LAYER
    label = {Split.HYBRID: "torch hybrid (TP groups x pipeline stages)", Split.TENSOR: "torch tensor parallel",
             Split.LAYER: "torch pipeline (one device per stage)", Split.NONE: "torch, one device"}[split]
    return _finish(ctx, split, Backend.TORCH, label, groups, ev)


# ---- the search shared by layer (optimized) and torch -------------------------------------------------------------


def _search(ctx: Context, backend: str, units: list[Unit], first_only: frozenset[int] = frozenset(),
            shape: Callable[[list[Unit]], bool] | None = None) -> list[Group] | None:
    spec, req, facts, p = ctx.spec, ctx.req, ctx.facts, ctx.profile
    L = spec.n_layers
    torch = backend == "torch"
    act = 2 if torch else 4
    if len(units) > MAX_UNITS:  # keep the fastest units (the search stays exact among them)
        units = sorted(units, key=lambda u: -sum(p.device(d).mem_bandwidth_gbs for d in u.devices))[:MAX_UNITS]
    mat = sum(facts.layer_matrix_bytes) / L
    quant = sum(facts.layer_quant_bytes) / L
    oth = sum(facts.layer_other_bytes) / L
    kv = facts.kv_bytes(req.ctx, req.ubatch, 0, L) / L
    host_cpu = ctx.host_cpu.id if (ctx.host_cpu and not torch) else None
    extra = ctx.cpu_extra if host_cpu else None  # llama.cpp's repacked copies on the CPU, beside the mapped file
    repacked = extra.layer_bytes if extra else (0,) * L
    mean_layer = (mat, oth, kv, sum(repacked) / L)
    max_layer = (max(facts.layer_matrix_bytes), max(facts.layer_other_bytes),
                 max(facts.kv_cells(req.ctx, req.ubatch, i) * facts.kv_bytes_per_cell[i] for i in range(L)),
                 max(repacked))
    layer_sizes = mean_layer  # per-layer (matrix, other, KV, CPU copies) bytes the capacity estimate assumes
    util = req.torch_gpu_util if torch else 1.0

    def fixed_bytes(dev: Device, s: float, last: bool) -> int:
        b = GPU_OVERHEAD_BYTES[backend] if dev.backend != "cpu" else 0
        b += compute_bytes(spec, ctx=req.ctx, ubatch=req.ubatch, n_layers=1, last=last, flash_attn=req.flash_attn,
                           share=s)
        if last:
            b += facts.misc_bytes + int(facts.output_bytes * (s if torch else 1.0))
            b += int(facts.embd_bytes * s) if torch and not spec.tied_output else 0
        if dev.id == host_cpu:
            b += facts.embd_bytes + (extra.output_bytes if last and extra else 0)
        return b

    def cost(i: int, last: bool) -> StageCosts | None:
        u = units[i]
        cap, layer_s, fixed_s = 10**9, 0.0, 0.0
        lm, lo, lk, lx = layer_sizes
        for d, s in zip(u.devices, u.shares, strict=True):
            dev = p.device(d)
            per_layer = lm * s + lo + lk * s + (lx if d == host_cpu else 0)
            room = planned_capacity(dev, util) - fixed_bytes(dev, s, last)
            cap = min(cap, int(room // per_layer) if room > 0 else 0)
            layer_read = mat * s + oth + quant_kernel_bytes(quant * s, dev, backend)
            layer_s = max(layer_s, read_time_s(layer_read, dev, backend))
            if last:
                out = facts.output_bytes * (s if torch else 1.0)
                out += quant_kernel_bytes(facts.output_quant_bytes * s, dev, backend)
                fixed_s = max(fixed_s, read_time_s(out, dev, backend))
        dev0 = p.device(u.devices[0])
        layer_s += costs(backend, dev0).layer_overhead_s
        if len(u.devices) > 1:
            layer_s += 2 * allreduce_s(p, u.devices, spec.n_embd * act, one_shot=torch)
        return StageCosts(layer_s=layer_s, cap_layers=min(cap, L), fixed_s=fixed_s)

    def handoff(i: int, j: int) -> float:
        stage = costs(backend, p.device(units[j].devices[0])).stage_overhead_s
        return transfer_s(p, units[i].devices[-1], units[j].devices[0], spec.n_embd * act) + stage

    def allowed(members: tuple[int, ...]) -> bool:
        devs = [d for i in members for d in units[i].devices]
        return len(devs) == len(set(devs)) and (shape is None or shape([units[i] for i in members]))

    for per_layer in (mean_layer, max_layer):  # layers differ (Q6_K ones are larger): retry with the largest
        layer_sizes = per_layer
        found = best_layout(units, L, cost=cost, handoff_s=handoff, allowed=allowed, first_only=first_only,
                            cyclic=torch)
        if found is None:
            return None
        order, _counts, _total = found
        stages = [units[i] for i in order]
        bounds = _refine(ctx, backend, stages, fixed_bytes, util)
        if bounds is not None:
            return [Group(u.devices, (bounds[k], bounds[k + 1]), kv_heads=u.kv_heads) for k, u in enumerate(stages)]
    return None


def _refine(ctx: Context, backend: str, stages: list[Unit], fixed_bytes, util: float) -> list[int] | None:
    """Exact DP over layer boundaries for the chosen stage order, with every layer's true bytes."""
    p, facts, req = ctx.profile, ctx.facts, ctx.req
    L = ctx.spec.n_layers
    kv_l = [facts.kv_cells(req.ctx, req.ubatch, i) * facts.kv_bytes_per_cell[i] for i in range(L)]
    host_cpu = ctx.host_cpu.id if (ctx.host_cpu and backend != "torch") else None
    tables = []
    for k, u in enumerate(stages):
        rows = []
        for d, s in zip(u.devices, u.shares, strict=True):
            dev = p.device(d)
            read = [facts.layer_matrix_bytes[i] * s + facts.layer_other_bytes[i] for i in range(L)]
            mem = [read[i] + kv_l[i] * s for i in range(L)]
            if d == host_cpu:  # llama.cpp's repacked copies, beside the mapped file
                mem = [m + x for m, x in zip(mem, ctx.cpu_extra.layer_bytes, strict=True)]
            room = planned_capacity(dev, util) - fixed_bytes(dev, s, k == len(stages) - 1)
            rate = dev.mem_bandwidth_gbs * 1e9 * costs(backend, dev).bw_eff
            rows.append((_prefix(read), _prefix(mem), room, rate))
        over = costs(backend, p.device(u.devices[0])).layer_overhead_s
        if len(u.devices) > 1:
            over += 2 * allreduce_s(p, u.devices, ctx.spec.n_embd * (2 if backend == "torch" else 4),
                                    one_shot=backend == "torch")
        tables.append((rows, over))

    def stage_time(k: int, a: int, b: int) -> float | None:
        rows, over = tables[k]
        worst = 0.0
        for pr, pm, room, rate in rows:
            if pm[b] - pm[a] > room:
                return None
            worst = max(worst, (pr[b] - pr[a]) / rate)
        return worst + over * (b - a)

    found = exact_boundaries(L, len(stages), stage_time)
    return None if found is None else found[0]


def _prefix(xs: Sequence[float]) -> list[float]:
    out = [0.0]
    for x in xs:
        out.append(out[-1] + x)
    return out
