"""Memory and predicted time of one concrete layout (ordered groups with layer ranges), per backend."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

from mixrun.model.spec import ModelSpec
from mixrun.planner.cost import (
    MOE_LAYER_OVERHEAD_S,
    MOE_PREFILL_EFF,
    allreduce_s,
    costs,
    flop_time_s,
    layer_overhead_s,
    prefill_type_factor,
    quant_kernel_bytes,
    read_time_s,
    stage_cost_s,
    transfer_s,
)
from mixrun.planner.memory import GPU_OVERHEAD_BYTES, ExtraBuffers, ModelFacts, compute_bytes, output_buffer_bytes
from mixrun.planner.tensor_split import TensorSplitModel
from mixrun.planner.types import DeviceUse, Group, PlanRequest, Timing
from mixrun.rig.profile import Device, RigProfile

F32 = 4


@dataclass(frozen=True)
class Context:
    """Everything one planning run shares: the rig, the model and the request."""

    profile: RigProfile
    spec: ModelSpec
    req: PlanRequest
    facts: ModelFacts = field(compare=False)

    @cached_property
    def gpus(self) -> tuple[Device, ...]:
        """GPUs on the first host (llama.cpp runs on one host)."""
        return self.profile.host_gpus()

    @cached_property
    def all_gpus(self) -> tuple[Device, ...]:
        return tuple(d for d in self.profile.devices if d.backend != "cpu")

    @cached_property
    def host_cpu(self) -> Device | None:
        """The CPU device of the first host: where llama.cpp keeps the input embedding and the logits."""
        return next((d for d in self.profile.devices if d.backend == "cpu" and self.host_id(d) == self.first_host),
                    None)

    @cached_property
    def cpu_extra(self) -> ExtraBuffers:
        """llama.cpp's repacked weights on the first host's CPU: the extra buffer types its profile says are in use
        there (none when it does not say, as curated profiles do not)."""
        host = self.profile.host_of(self.host_cpu) if self.host_cpu is not None else None
        return ExtraBuffers(self.spec, (host.llamacpp_extra_buffers or ()) if host is not None else ())

    def host_id(self, d: Device) -> str | None:
        h = self.profile.host_of(d)
        return h.id if h else None

    @cached_property
    def first_host(self) -> str | None:
        """The host of the profile's first device (None in a profile without [[hosts]])."""
        return self.host_id(self.profile.devices[0])

    @cached_property
    def tensor_model(self) -> TensorSplitModel:
        """llama.cpp's tensor-split placement of this model, shared by every ``-ts`` the planner tries."""
        return TensorSplitModel(self.spec, self.facts.kv_bytes_per_cell)

    @cached_property
    def _layer_qtypes(self) -> dict[str, int]:
        """Elements of the layer matrices, per quant type."""
        out: dict[str, int] = {}
        for t in self.spec.tensors:
            if t.layer is not None and len(t.shape) >= 2:
                out[t.qtype] = out.get(t.qtype, 0) + t.n_elements
        return out

    @cached_property
    def _quant_factors(self) -> dict[tuple[str, str, str], float]:
        return {}

    def quant_factor(self, dev: Device, backend: str) -> float:
        """Prefill matmul rate of this model's layer matrices on ``dev`` relative to its class's rate, weighted by
        their elements: each quant type's factor for the kernel llama.cpp picks there
        (:func:`cost.prefill_type_factor`, at the request's llama.cpp build)."""
        key = (dev.name, dev.backend, backend)
        if key not in self._quant_factors:
            n = self._layer_qtypes
            den = sum(n.values())
            self._quant_factors[key] = (sum(k * prefill_type_factor(dev, q, backend, self.req.llamacpp_build)
                                            for q, k in n.items()) / den) if den else 1.0
        return self._quant_factors[key]

    @cached_property
    def row_floats_per_token(self) -> tuple[int, int]:
        """llama.cpp ``-sm row``, per token per layer: the floats every split matmul writes (its output rows, of
        which the other GPUs' part crosses to the main GPU) and reads (its input, sent from the main GPU to every
        other GPU), summed over one layer's matrices (the first layer's)."""
        out = inp = 0
        for t in self.spec.tensors:
            if t.layer == 0 and len(t.shape) == 2:
                out += t.shape[0]
                inp += t.shape[1]
        return out, inp

    def prefill_compute_s(self, flops: float, n_layers: int, share: float, dev: Device, backend: str,
                          expert_flops: float = 0.0) -> float:
        """One device's prefill work on its layers: the matmul FLOPs at its prefill rate for the model's quant
        types (routed experts' at :data:`MOE_PREFILL_EFF` of it), and attention's traffic beyond its FLOPs."""
        return (flop_time_s(flops + expert_flops / MOE_PREFILL_EFF, dev, backend, self.quant_factor(dev, backend))
                + self.attention_s(n_layers, share, dev, backend))

    def prompt_flops(self, layers: range, share: float = 1.0) -> tuple[float, float]:
        """(dense, routed-expert) matmul FLOPs of the prompt through ``layers``, for ``share`` of every matrix: the
        experts' are those of the ``used`` experts a token runs."""
        mf, P = self.facts, self.req.prompt_tokens
        dense = 2.0 * sum(mf.dense_params[i] for i in layers) * share * P
        return dense, 2.0 * sum(mf.active_params[i] for i in layers) * share * P - dense

    def attention_s(self, n_layers: int, share: float, dev: Device, backend: str) -> float:
        """Prefill attention beyond its FLOPs: without flash attention the KQ scores (prompt x prompt / 2 per
        head, F32) are written, read by the softmax, written and read again, at the device's decode bandwidth."""
        if self.req.flash_attn:
            return 0.0
        P = self.req.prompt_tokens
        kq_bytes = 4 * F32 * P * P / 2 * self.spec.n_head * n_layers * share
        return read_time_s(kq_bytes, dev, backend)


@dataclass(frozen=True)
class Evaluation:
    devices: tuple[DeviceUse, ...]
    decode: Timing
    prefill_s: float
    stage_s: tuple[float, ...]  # decode seconds of each group (compute + overhead + TP), for the "why"

    @property
    def fits(self) -> bool:
        return all(d.fits for d in self.devices)


class _Ledger:
    """Bytes per device, accumulated in the order devices first appear."""

    def __init__(self) -> None:
        self.rows: dict[str, list[int]] = {}

    def add(self, dev: str, weights: int = 0, kv: int = 0, comp: int = 0, ovh: int = 0) -> None:
        r = self.rows.setdefault(dev, [0, 0, 0, 0])
        r[0] += weights
        r[1] += kv
        r[2] = max(r[2], comp)  # one compute buffer per device, sized for its largest use
        r[3] = max(r[3], ovh)

    def uses(self, profile: RigProfile, gpu_util: float = 1.0) -> tuple[DeviceUse, ...]:
        return tuple(DeviceUse(id=d, weights_bytes=r[0], kv_bytes=r[1], compute_bytes=r[2], overhead_bytes=r[3],
                               capacity_bytes=planned_capacity(profile.device(d), gpu_util))
                     for d, r in self.rows.items())


def planned_capacity(dev: Device, gpu_util: float = 1.0) -> int:
    """Bytes the planner may fill on a device: the torch backend keeps ``1 - gpu_util`` of each GPU free for
    allocator fragmentation and NCCL buffers; llama.cpp allocates exact buffers and plans to the profile's capacity."""
    return dev.capacity_bytes if dev.backend == "cpu" else int(dev.capacity_bytes * gpu_util)


def evaluate_pipeline(ctx: Context, backend: str, groups: list[Group], *, split_output: bool = False) -> Evaluation:
    """A pipeline of groups (each maybe TP): the layout of ``none``, ``layer``, ``tensor`` and ``hybrid``.

    ``split_output``: the last group shards the output projection like its layers (TP backends)."""
    p, spec, req, facts = ctx.profile, ctx.spec, ctx.req, ctx.facts
    led = _Ledger()
    torch = backend == "torch"
    act_bytes = 2 if torch else F32
    cpu = ctx.host_cpu if not torch else None
    if cpu is not None:  # llama.cpp: the input embedding and the returned logits live in host memory
        led.add(cpu.id, weights=facts.embd_bytes, comp=output_buffer_bytes(spec, req.batch))
    # llama.cpp offloads the output layer only when every layer is offloaded; with CPU layers it stays on the host
    out_on_host = cpu is not None and any(d == cpu.id for g in groups for d in g.devices)
    cpu_layers = range(0)
    stage_s: list[float] = []
    compute = tp_comm = handoff = overhead = 0.0
    prefill_parts: list[float] = []
    n_micro = max(1, math.ceil(req.prompt_tokens / req.ubatch))
    for gi, g in enumerate(groups):
        first, last = gi == 0, gi == len(groups) - 1
        a, b = g.layers
        devs = [p.device(d) for d in g.devices]
        dev_s, dev_pre = [], []
        for dev, s in zip(devs, g.shares, strict=True):
            w = facts.weights(a, b, s)
            # a MoE layer's decode step reads only the experts its token picks (used / count of them)
            unread = (sum(facts.expert_bytes[a:b]) - sum(facts.active_expert_bytes[a:b])) * s
            read = w - unread + quant_kernel_bytes(facts.quant_bytes(a, b, s) - unread, dev, backend)
            on_this = dev.id == cpu.id if out_on_host else last
            if on_this:
                out = int(facts.output_bytes * (s if (torch or split_output) else 1.0))
                if cpu is not None and dev.id == cpu.id and spec.tied_output:
                    out -= facts.embd_bytes  # a tied output on the host is the embedding table itself
                w += out + facts.misc_bytes
                read += out + quant_kernel_bytes(facts.output_quant_bytes * s, dev, backend)
                if torch and last and not spec.tied_output:  # vocab-parallel embedding, with the output (shared if tied)
                    w += int(facts.embd_bytes * s)
            if cpu is not None and dev.id == cpu.id:
                cpu_layers = range(a, b)
            kv = int(facts.kv_bytes(req.ctx, req.ubatch, a, b, full=torch) * s)
            comp = compute_bytes(spec, ctx=req.ctx, ubatch=req.ubatch, n_layers=b - a, last=last,
                                 flash_attn=req.flash_attn, share=s, start=a, kv_type=req.kv_type)
            ovh = GPU_OVERHEAD_BYTES[backend] if dev.backend != "cpu" else 0
            led.add(dev.id, weights=w, kv=kv, comp=comp, ovh=ovh)
            dev_s.append(read_time_s(read, dev, backend))
            flops, experts = ctx.prompt_flops(range(a, b), s)
            flops += 2.0 * req.prompt_tokens**2 * spec.n_head * spec.head_dim * (b - a) * s  # causal attention
            dev_pre.append(ctx.prefill_compute_s(flops, b - a, s, dev, backend, experts))
        c0 = costs(backend, devs[0])
        g_compute = max(dev_s)
        g_overhead = (layer_overhead_s(backend, devs[0], req.llamacpp_build) * (b - a)
                      + MOE_LAYER_OVERHEAD_S * sum(1 for e in facts.expert_bytes[a:b] if e))
        g_tp = 2 * (b - a) * allreduce_s(p, g.devices, spec.n_embd * act_bytes, one_shot=torch) if g.tp > 1 else 0.0
        compute += g_compute
        overhead += g_overhead
        tp_comm += g_tp
        stage_s.append(g_compute + g_overhead + g_tp)
        # per ubatch: each layer's fixed cost, and under TP two all-reduces of ubatch x n_embd activations
        pre = max(dev_pre) + c0.prefill_fixed_s(b - a, n_micro)
        if g.tp > 1:
            ub = min(req.ubatch, req.prompt_tokens)
            pre += n_micro * 2 * (b - a) * allreduce_s(p, g.devices, ub * spec.n_embd * act_bytes, one_shot=torch)
        if not first:
            prev = groups[gi - 1].devices[-1]
            handoff += (transfer_s(p, prev, g.devices[0], spec.n_embd * act_bytes)
                        + stage_cost_s(p, prev, g.devices[0], backend))
            pre += transfer_s(p, prev, g.devices[0], req.prompt_tokens * spec.n_embd * act_bytes)
        prefill_parts.append(pre)
    if cpu is not None:  # repacked copies of the weights the CPU multiplies, beside the mapped file
        led.add(cpu.id, weights=ctx.cpu_extra.host_bytes(cpu_layers, output=out_on_host))
    if torch and len(groups) > 1:  # the last stage looks up the next token's embedding and sends it to the first
        handoff += transfer_s(p, groups[-1].devices[-1], groups[0].devices[0], spec.n_embd * act_bytes)
    if cpu is not None:
        first_dev, last_dev = groups[0].devices[0], groups[-1].devices[-1]
        if first_dev != cpu.id:  # embedding rows go up, logits come back down
            handoff += transfer_s(p, cpu.id, first_dev, spec.n_embd * F32)
        if last_dev != cpu.id:
            handoff += transfer_s(p, last_dev, cpu.id, spec.n_vocab * F32)
    overhead += costs(backend, p.device(groups[0].devices[0])).token_overhead_s
    pipelined = costs(backend, p.device(groups[0].devices[0])).pipelined_prefill and n_micro > 1
    if pipelined:
        prefill_s = sum(prefill_parts) / n_micro + max(prefill_parts) * (n_micro - 1) / n_micro
    else:
        prefill_s = sum(prefill_parts)
    util = req.torch_gpu_util if torch else 1.0
    return Evaluation(devices=led.uses(p, util), decode=Timing(compute, tp_comm, handoff, overhead),
                      prefill_s=prefill_s, stage_s=tuple(stage_s))


def evaluate_row(ctx: Context, gpus: list[Device], ratios: list[float], main: str) -> Evaluation:
    """llama.cpp ``-sm row``: every layer's matrices split by ``ratios``; norms, KV cache, output and compute
    buffers on the main GPU; after each split matmul the partial results are gathered on the main GPU."""
    p, spec, req, facts = ctx.profile, ctx.spec, ctx.req, ctx.facts
    led = _Ledger()
    L = spec.n_layers
    cpu = ctx.host_cpu
    if cpu is not None:
        led.add(cpu.id, weights=facts.embd_bytes, comp=output_buffer_bytes(spec, req.batch))
    total = sum(ratios)
    shares = [r / total for r in ratios]
    matrix = sum(facts.layer_matrix_bytes)
    others = sum(facts.layer_other_bytes) + facts.misc_bytes
    dev_s, dev_pre = [], []
    for dev, s in zip(gpus, shares, strict=True):
        w = int(matrix * s)
        kv = comp = 0
        if dev.id == main:
            w += others + facts.output_bytes
            kv = facts.kv_bytes(req.ctx, req.ubatch, 0, L)
            comp = compute_bytes(spec, ctx=req.ctx, ubatch=req.ubatch, n_layers=L, last=True,
                                 flash_attn=req.flash_attn, kv_type=req.kv_type)
        else:
            comp = 2 * req.ubatch * spec.n_ff * F32
        led.add(dev.id, weights=w, kv=kv, comp=comp, ovh=GPU_OVERHEAD_BYTES["llama.cpp"])
        read = matrix * s + (others + facts.output_bytes if dev.id == main else 0)
        dev_s.append(read_time_s(read, dev, "llama.cpp"))
        flops, experts = ctx.prompt_flops(range(L), s)
        flops += 2.0 * req.prompt_tokens**2 * spec.n_head * spec.head_dim * L * (1.0 if dev.id == main else 0.0)
        dev_pre.append(ctx.prefill_compute_s(flops, L if dev.id == main else 0, 1.0, dev, "llama.cpp", experts))
    c = costs("llama.cpp", p.device(main))
    layer_s = layer_overhead_s("llama.cpp", p.device(main), req.llamacpp_build)
    others = [p.link(d.id, main) for d in gpus if d.id != main]
    fast = all(lk.kind in ("nvlink", "nvswitch") for lk in others)
    worst_bw = min(lk.bandwidth_gbs for lk in others) * 1e9
    # measured per-layer synchronisation of row split (grows with the number of GPUs: 400 us for 2, ~550 for 4)
    per_layer = (c.row_sync_fast_s if fast else c.row_sync_slow_s) * (1 + 0.2 * (len(gpus) - 2))
    sync_s = per_layer * L
    compute = max(dev_s)
    overhead = layer_s * L + c.token_overhead_s
    handoff = 0.0
    if cpu is not None:
        handoff = transfer_s(p, cpu.id, main, spec.n_embd * F32) + transfer_s(p, main, cpu.id, spec.n_vocab * F32)
    # prefill, per ubatch: every split matmul's input goes from the main GPU to each other GPU and their part of
    # its output comes back, all F32 through the main GPU's link; then the per-layer sync and fixed cost
    n = len(gpus)
    out_f, in_f = ctx.row_floats_per_token
    bus_bytes = L * req.prompt_tokens * F32 * (out_f * (n - 1) / n + in_f * (n - 1))
    n_micro = max(1, math.ceil(req.prompt_tokens / req.ubatch))
    pre = max(dev_pre) + sync_s * n_micro + c.prefill_fixed_s(L, n_micro) \
        + bus_bytes / worst_bw
    return Evaluation(devices=led.uses(p), decode=Timing(compute, sync_s, handoff, overhead), prefill_s=pre,
                      stage_s=(compute + sync_s,))


def evaluate_tensor(ctx: Context, gpus: list[Device], ts: list[float]) -> Evaluation:
    """llama.cpp ``-sm tensor`` over ``gpus`` with ``-ts ts``: every layer split as llama.cpp rounds it
    (:mod:`mixrun.planner.tensor_split`), two all-reduces per layer, the whole graph's compute buffer on each GPU,
    the token embedding and the returned logits on the host."""
    p, spec, req, facts = ctx.profile, ctx.spec, ctx.req, ctx.facts
    place = ctx.tensor_model.place(ts)
    led = _Ledger()
    L = spec.n_layers
    cpu = ctx.host_cpu
    if cpu is not None:
        led.add(cpu.id, weights=facts.embd_bytes, comp=output_buffer_bytes(spec, req.batch))
    comp = compute_bytes(spec, ctx=req.ctx, ubatch=req.ubatch, n_layers=L, last=True, flash_attn=req.flash_attn,
                         kv_type=req.kv_type)
    cells = [facts.kv_cells(req.ctx, req.ubatch, il) for il in range(L)]
    rates = [d.mem_bandwidth_gbs * 1e9 * costs("llama.cpp", d).bw_eff for d in gpus]
    total_read = [sum(r[k] for r in place.layer_reads) + place.output_reads[k] for k in range(len(gpus))]
    pre = []
    for k, dev in enumerate(gpus):
        kv = sum(c * place.kv_per_cell[il][k] for il, c in enumerate(cells))
        led.add(dev.id, weights=place.weights[k], kv=kv, comp=comp, ovh=GPU_OVERHEAD_BYTES["llama.cpp"])
        frac = total_read[k] / max(1, sum(total_read))
        flops, experts = ctx.prompt_flops(range(L), frac)
        flops += 2.0 * req.prompt_tokens**2 * spec.n_head * spec.head_dim * L * frac
        pre.append(ctx.prefill_compute_s(flops, L, frac, dev, "llama.cpp", experts))
    compute = sum(max(r[k] / rates[k] for k in range(len(gpus))) for r in place.layer_reads)
    compute += max(place.output_reads[k] / rates[k] for k in range(len(gpus)))
    ids = tuple(d.id for d in gpus)
    tp = 2 * L * allreduce_s(p, ids, spec.n_embd * F32)
    c = costs("llama.cpp", gpus[0])
    overhead = layer_overhead_s("llama.cpp", gpus[0], ctx.req.llamacpp_build) * L + c.token_overhead_s
    handoff = 0.0
    if cpu is not None:
        handoff = transfer_s(p, cpu.id, ids[0], spec.n_embd * F32) + transfer_s(p, ids[-1], cpu.id, spec.n_vocab * F32)
    n_micro = max(1, math.ceil(req.prompt_tokens / req.ubatch))
    ub = min(req.ubatch, req.prompt_tokens)
    prefill = max(pre) + c.prefill_fixed_s(L, n_micro) \
        + n_micro * 2 * L * allreduce_s(p, ids, ub * spec.n_embd * F32)
    return Evaluation(devices=led.uses(p), decode=Timing(compute, tp, handoff, overhead), prefill_s=prefill,
                      stage_s=(compute + tp,))
