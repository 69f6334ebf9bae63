"""One small builder per split mode. Each returns a Candidate (or None when the split cannot apply) with its
memory, predicted speed, a one-line why, and the commands that reproduce it."""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence

from mixrun.alloc import allocate
from mixrun.model.spec import ModelSpec, TensorSpec, with_tensors
from mixrun.planner.cost import (
    QUANT_KERNEL_EFF,
    allreduce_s,
    costs,
    layer_overhead_s,
    quant_kernel_bytes,
    read_time_s,
    stage_cost_s,
    transfer_s,
)
from mixrun.planner.evaluate import (
    Context,
    Evaluation,
    evaluate_pipeline,
    evaluate_row,
    evaluate_tensor,
    planned_capacity,
)
from mixrun.planner.memory import F32, GPU_OVERHEAD_BYTES, PLAIN_TYPES, ModelFacts, compute_bytes
from mixrun.planner.search import (
    StageCosts,
    Unit,
    best_layout,
    exact_boundaries,
    kv_head_counts,
    shift_descent,
    tp_cliques,
)
from mixrun.planner.types import Candidate, Group
from mixrun.rig.profile import Device
from mixrun.units import shortfalls
from mixrun.vocab import BACKEND_ARCHS, LLAMACPP_TENSOR_ARCHS, TORCH_BLOCK_TYPES, Backend, KVType, Split

GGML_TYPE = {KVType.F16: 1, KVType.Q4_0: 2, KVType.Q8_0: 8}  # llama.cpp's -ctk/-ctv element types (ggml_type)
# A multi-device plan is chosen over the best single device that fits only when its predicted decode beats it by
# this share. On the published rows the cost model fits (docs/benchmarks.md, 2026-12-04), predicted/measured decode
# has an interquartile range of 0.96-1.16 (0.91-1.06 on 2025-26 builds): about +-8-10% around the median. Two
# predictions on one rig and model share most of their error, so a predicted gain under 10% is within the model's
# noise, and one card is simpler and free of the stalls the model has no switch for.
SPLIT_MARGIN = 0.10
MAX_UNITS = 12  # Held-Karp is exponential in the units considered; beyond this only the fastest are kept
MAX_SUBSET_GPUS = 6  # up to this many GPUs on a host, llama.cpp splits are planned over every subset (57 for 6)
MAX_SUBSETS = 64  # beyond this many class-prefix subsets, the fastest 2, 4, 8, ... GPUs
TS_SEARCH_GPUS = 4  # a tensor split's -ts is refined by local search over at most this many mixed GPUs


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


LLAMA_DEVICE_PREFIX = {"cuda": "CUDA", "rocm": "ROCm", "vulkan": "Vulkan", "metal": "MTL"}


def llama_device_name(ctx: Context, dev: str) -> str:
    """llama.cpp's name for a GPU of the first host (``CUDA1``, llama-server ``--device``): its backend's prefix and
    its index among that host's GPUs of the same backend, in profile order (the order the backend numbers them)."""
    d = ctx.profile.device(dev)
    same = [g.id for g in ctx.gpus if g.backend == d.backend]
    return f"{LLAMA_DEVICE_PREFIX.get(d.backend, d.backend.upper())}{same.index(dev)}"


def gpu_subsets(gpus: Sequence[Device], min_size: int = 2) -> list[tuple[Device, ...]]:
    """The GPU sets a llama.cpp split is planned over: every subset of at least ``min_size`` GPUs where there are
    at most :data:`MAX_SUBSET_GPUS`; on bigger hosts, for each class of identical GPUs, its first k for every k
    (identical GPUs are interchangeable up to their links), or with too many kinds of GPU the fastest 2, 4, 8, ...
    Up to six GPUs a rig's subsets include every subset a smaller rig of the same GPUs has, so adding a card never
    makes the best llama.cpp plan slower; beyond, that holds within each kind of GPU."""
    gpus = list(gpus)
    if len(gpus) <= MAX_SUBSET_GPUS:
        return [c for k in range(min_size, len(gpus) + 1) for c in itertools.combinations(gpus, k)]
    classes: dict[tuple, list[Device]] = {}
    for g in gpus:
        classes.setdefault((g.backend, g.name, g.vram_gib, g.mem_bandwidth_gbs), []).append(g)
    if math.prod(len(c) + 1 for c in classes.values()) > MAX_SUBSETS:  # many kinds of GPU: the fastest first
        ranked = sorted(gpus, key=lambda g: (-g.mem_bandwidth_gbs, -g.capacity_bytes))
        sizes = sorted({min(2**k, len(gpus)) for k in range(1, len(gpus).bit_length() + 1)} | {len(gpus)})
        return [tuple(g for g in gpus if g in ranked[:k]) for k in sizes if k >= min_size]
    out = []
    for counts in itertools.product(*(range(len(c) + 1) for c in classes.values())):
        if sum(counts) >= min_size:
            chosen = {g.id for c, k in zip(classes.values(), counts, strict=True) for g in c[:k]}
            out.append(tuple(g for g in gpus if g.id in chosen))
    return out


def best_over_subsets(ctx: Context, build: Callable[[Context, Sequence[Device]], Candidate | None]
                      ) -> Candidate | None:
    """The best of ``build`` over every GPU subset: the fastest that fits (a subset with more GPUs only when it is
    faster by :data:`SPLIT_MARGIN`), else the one closest to fitting."""
    found = [c for c in (build(ctx, sub) for sub in gpu_subsets(ctx.gpus)) if c is not None]
    fitting = sorted((c for c in found if c.fits), key=lambda c: (len(c.groups[0].devices), -c.decode_tok_s))
    if fitting:  # from the fewest GPUs up, more GPUs only for a gain past the margin (as the plan's choice does)
        best = fitting[0]
        for c in fitting[1:]:
            if c.decode_tok_s >= best.decode_tok_s * (1 + SPLIT_MARGIN):
                best = c
        return best
    return min(found, key=lambda c: sum(d.shortfall_bytes for d in c.devices)) if found else None


def _device_list(ctx: Context, gpus: Sequence[Device], llama: dict) -> tuple[str, str]:
    """For a split over some of the host's GPUs: the device list llama.cpp loads onto (``llama_model_params.devices``
    , llama-server ``--device``), so the GPUs left out hold nothing and join no split; ``-ts`` and ``-mg`` then
    index that list. Returns the llama-server flag and the label's device names ("" and "all GPUs" for all)."""
    if len(gpus) == len(ctx.gpus):
        return "", "all GPUs"
    names = [llama_device_name(ctx, d.id) for d in gpus]
    llama["devices"] = names
    return f" --device {','.join(names)}", "+".join(d.id for d in gpus)


def _kv_flags(ctx: Context) -> str:
    """llama-server flags for the cache type and micro-batch the plan's memory assumes (its defaults otherwise)."""
    kv, ub = ctx.req.kv_type, ctx.req.ubatch
    flags = f" -ctk {kv} -ctv {kv}" if kv != "f16" else ""
    return flags + (f" -ub {ub} -b {max(2048, ub)}" if ub != 512 else "")


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
    link = ctx.profile.link
    worst = min((link(a, b) for i, a in enumerate(devices) for b in devices[i + 1:]), key=lambda lk: lk.bandwidth_gbs)
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
    if ctx.req.ubatch != 512:  # llama-cpp-python's n_batch and n_ubatch are 512
        llama["n_batch"] = llama["n_ubatch"] = ctx.req.ubatch
    if ctx.spec.sliding_window:  # llama-cpp-python defaults to a full-size cache for sliding-window layers
        llama["swa_full"] = False  # (llama_context_default_params); the plan and llama-server size them to the window
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


# llama.cpp PR #24216 (2026-06-05) removed the CUDA split buffer that -sm row needs: the llama.cpp vendored by
# llama-cpp-python 0.3.36 throws "device CUDA0 does not support split buffers" (make_gpu_buft_list,
# src/llama-model.cpp; docs/llamacpp-placement.md). Row is still planned, for older builds and the published
# figures measured on them, but chosen only when asked for.
ROW_GONE = "llama.cpp removed -sm row for CUDA in June 2026 (PR #24216): planned for older builds, chosen only on request"


def row(ctx: Context, gpus: Sequence[Device] | None = None) -> Candidate | None:
    """llama.cpp ``-sm row`` over ``gpus`` (default: every GPU of the host), as builds before 2026-06 ran it."""
    gpus = list(ctx.gpus if gpus is None else gpus)
    if len(gpus) < 2:
        return None
    ratios = [float(d.capacity_bytes) for d in gpus]
    main = max(gpus, key=lambda d: (d.capacity_bytes, -gpus.index(d))).id
    ev = evaluate_row(ctx, gpus, ratios, main)
    groups = [Group(tuple(d.id for d in gpus), (0, ctx.spec.n_layers), tuple(r / sum(ratios) for r in ratios))]
    mg = [d.id for d in gpus].index(main)
    llama = {"n_gpu_layers": -1, "split_mode": 2, "main_gpu": mg, "n_ctx": ctx.req.ctx}
    flag, which = _device_list(ctx, gpus, llama)
    _llama_common(ctx, llama)
    c = _finish(ctx, Split.ROW, Backend.LLAMACPP, f"llama.cpp row ({which}; builds before 2026-06)",
                groups, ev, llama, f"-ngl 999 -sm row -mg {mg}{flag}")
    return dataclasses.replace(c, why=c.why + "; " + ROW_GONE)


def tensor_llamacpp(ctx: Context, gpus: Sequence[Device] | None = None) -> Candidate | None:
    """llama.cpp ``-sm tensor`` over ``gpus`` (default: every GPU of the host): needs flash attention, an f16 KV
    cache, and a supported architecture. Bytes per GPU are llama.cpp's own rounding of ``-ts``
    (:mod:`mixrun.planner.tensor_split`), and the ``-ts`` is the fastest that fits."""
    gpus = list(ctx.gpus if gpus is None else gpus)
    if len(gpus) < 2 or ctx.spec.arch not in LLAMACPP_TENSOR_ARCHS or ctx.spec.n_head_kv < len(gpus):
        return None
    if not ctx.req.flash_attn or ctx.req.kv_type != KVType.F16:
        return None
    ts, ev = _tensor_ts(ctx, gpus)
    groups = [Group(tuple(d.id for d in gpus), (0, ctx.spec.n_layers), shares=tuple(t / sum(ts) for t in ts))]
    llama = {"n_gpu_layers": -1, "split_mode": 3, "tensor_split": ts, "n_ctx": ctx.req.ctx}
    _llama_common(ctx, llama)
    flag, which = _device_list(ctx, gpus, llama)
    return _finish(ctx, Split.TENSOR, Backend.LLAMACPP, f"llama.cpp tensor parallel ({which})", groups, ev,
                   llama, f"-ngl 999 -sm tensor -ts {','.join(f'{t:g}' for t in ts)} -fa on{flag}")


def _tensor_ts(ctx: Context, gpus: list[Device]) -> tuple[list[float], Evaluation]:
    """The ``-ts`` for a tensor split: shares in proportion to bandwidth (every GPU then reads its part of a layer
    in the same time), water-filled where a GPU would overflow: its share comes down to what it holds, and the rest
    goes to the others by bandwidth. The fastest vector that fits wins, else the one closest to fitting."""
    bw = [d.mem_bandwidth_gbs for d in gpus]
    tries: list[list[float]] = [bw, [float(d.capacity_bytes) for d in gpus]]
    fixed = [None] * len(gpus)
    ts = list(bw)
    for _ in range(12):  # water-filling: each pass fixes the GPUs that overflow at their largest share that fits
        ev = evaluate_tensor(ctx, gpus, _rounded(ts))
        uses = {u.id: u for u in ev.devices}
        over = [k for k, d in enumerate(gpus) if not uses[d.id].fits and fixed[k] is None]
        if not over:
            break
        total = sum(ts)
        for k in over:
            u = uses[gpus[k].id]
            base = u.compute_bytes + u.overhead_bytes  # what the GPU holds whatever its share (mirrored: approx.)
            frac = ts[k] / total
            fixed[k] = max(0.01, frac * (u.capacity_bytes - base) / max(1, u.total_bytes - base) * 0.995)
        free = 1.0 - sum(f for f in fixed if f is not None)
        rest = sum(b for b, f in zip(bw, fixed, strict=True) if f is None)
        if free <= 0 or rest == 0:
            break
        ts = [f if f is not None else free * b / rest for b, f in zip(bw, fixed, strict=True)]
        tries.append(list(ts))

    def score(t: list[float]) -> tuple[tuple, Evaluation]:
        ev = evaluate_tensor(ctx, gpus, t)
        return (not ev.fits, sum(u.shortfall_bytes for u in ev.devices), ev.decode.total_s), ev

    (_key, ev), ts = min(((score(t), t) for t in map(_rounded, tries)), key=lambda b: b[0][0])
    if len(gpus) > TS_SEARCH_GPUS or len({(d.name, d.capacity_bytes, d.mem_bandwidth_gbs) for d in gpus}) == 1:
        return ts, ev  # identical GPUs: equal shares; many GPUs: the water-filled -ts
    # llama.cpp rounds every split point down, so the best -ts sits near, not at, the proportional one: move share
    # between pairs of GPUs in shrinking steps while that reads faster (or comes closer to fitting)
    _key, ts, ev = shift_descent(ts, (0.02, 0.01, 0.005, 0.0025), 0.001, score, normalize=_rounded)
    return ts, ev


def _rounded(ts: Sequence[float]) -> list[float]:
    """``-ts`` as the plan writes it (three decimals of the normalised shares), so the plan evaluates exactly what
    llama.cpp will be given."""
    total = sum(ts)
    return [max(0.001, round(t / total, 3)) for t in ts]


# ---- torch: TP groups inside pipeline stages ----------------------------------------------------------------------


def float32_spec(spec: ModelSpec) -> ModelSpec:
    """The model as CPU ranks of the torch backend hold it: every tensor in float32."""
    return with_tensors(spec, [dataclasses.replace(t, qtype="F32", n_bytes=F32 * t.n_elements) for t in spec.tensors])


def torch_gpu_spec(spec: ModelSpec) -> ModelSpec:
    """The model as GPU ranks of the torch backend hold it: quantized tensors of a type it does not keep in GGUF
    blocks (MXFP4 experts, i-quants) in bf16, the others as they are (plain ones counted as stored)."""
    return with_tensors(spec, [dataclasses.replace(t, qtype="BF16", n_bytes=2 * t.n_elements) if _expanded(t) else t
                               for t in spec.tensors])


def _expanded(t: TensorSpec) -> bool:
    return t.qtype not in TORCH_BLOCK_TYPES and t.qtype not in PLAIN_TYPES


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
    elif any(_expanded(t) for t in ctx.spec.tensors):  # GPU ranks expand what they cannot keep in blocks
        ctx = dataclasses.replace(ctx, facts=ModelFacts(torch_gpu_spec(ctx.spec), ctx.req.kv_type))
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
    unread = (sum(facts.expert_bytes) - sum(facts.active_expert_bytes)) / L  # experts a MoE token does not pick
    quant = sum(facts.layer_quant_bytes) / L - unread
    oth = sum(facts.layer_other_bytes) / L
    kv = facts.kv_bytes(req.ctx, req.ubatch, 0, L, full=torch) / L
    host_cpu = ctx.host_cpu.id if (ctx.host_cpu and not torch) else None
    extra = ctx.cpu_extra if host_cpu else None  # llama.cpp's repacked copies on the CPU, beside the mapped file
    repacked = extra.layer_bytes if extra else (0,) * L
    mean_layer = (mat, oth, kv, sum(repacked) / L)
    max_layer = (max(facts.layer_matrix_bytes), max(facts.layer_other_bytes),
                 max(facts.kv_cells(req.ctx, req.ubatch, i, torch) * facts.kv_bytes_per_cell[i] for i in range(L)),
                 max(repacked))
    layer_sizes = mean_layer  # per-layer (matrix, other, KV, CPU copies) bytes the capacity estimate assumes
    util = req.torch_gpu_util if torch else 1.0

    def fixed_bytes(dev: Device, s: float, last: bool) -> int:
        b = GPU_OVERHEAD_BYTES[backend] if dev.backend != "cpu" else 0
        b += compute_bytes(spec, ctx=req.ctx, ubatch=req.ubatch, n_layers=1, last=last, flash_attn=req.flash_attn,
                           share=s, kv_type=req.kv_type)
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
            layer_read = (mat - unread) * s + oth + quant_kernel_bytes(quant * s, dev, backend)
            layer_s = max(layer_s, read_time_s(layer_read, dev, backend))
            if last:
                out = facts.output_bytes * (s if torch else 1.0)
                out += quant_kernel_bytes(facts.output_quant_bytes * s, dev, backend)
                fixed_s = max(fixed_s, read_time_s(out, dev, backend))
        dev0 = p.device(u.devices[0])
        layer_s += layer_overhead_s(backend, dev0, req.llamacpp_build)
        if len(u.devices) > 1:
            layer_s += 2 * allreduce_s(p, u.devices, spec.n_embd * act, one_shot=torch)
        return StageCosts(layer_s=layer_s, cap_layers=min(cap, L), fixed_s=fixed_s)

    def handoff(i: int, j: int) -> float:
        a, b = units[i].devices[-1], units[j].devices[0]
        return transfer_s(p, a, b, spec.n_embd * act) + stage_cost_s(p, a, b, backend)

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
    kv_l = [facts.kv_cells(req.ctx, req.ubatch, i, backend == "torch") * facts.kv_bytes_per_cell[i]
            for i in range(L)]
    host_cpu = ctx.host_cpu.id if (ctx.host_cpu and backend != "torch") else None
    tables = []
    for k, u in enumerate(stages):
        rows = []
        for d, s in zip(u.devices, u.shares, strict=True):
            dev = p.device(d)
            held = [facts.layer_matrix_bytes[i] * s + facts.layer_other_bytes[i] for i in range(L)]
            mem = [held[i] + kv_l[i] * s for i in range(L)]
            # what a decode step reads: a MoE layer's picked experts only
            read = [held[i] - (facts.expert_bytes[i] - facts.active_expert_bytes[i]) * s for i in range(L)]
            if d == host_cpu:  # llama.cpp's repacked copies, beside the mapped file
                mem = [m + x for m, x in zip(mem, ctx.cpu_extra.layer_bytes, strict=True)]
            room = planned_capacity(dev, util) - fixed_bytes(dev, s, k == len(stages) - 1)
            rate = dev.mem_bandwidth_gbs * 1e9 * costs(backend, dev).bw_eff
            rows.append((_prefix(read), _prefix(mem), room, rate))
        over = layer_overhead_s(backend, p.device(u.devices[0]), req.llamacpp_build)
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
