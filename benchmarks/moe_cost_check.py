"""MoE cost model vs published results: predict every scorable ``[[moe]]`` row of docs/cost-model-data.toml.

For each row this writes a sparse GGUF of the model's shape (tests/gguf_factory.py), builds the rig from datasheet
figures plus what the source says of the host, and evaluates the published placement itself with
``mixrun.planner.moe.evaluate_moe``: every layer on the one GPU, the routed experts of layers ``0..N-1`` in host RAM
for ``--n-cpu-moe N``. It prints predicted vs measured decode and prefill, and, for the same rig, the placement
mixrun itself would choose.

The planner is pure, so the numbers do not depend on the machine running this script.

Usage: python benchmarks/moe_cost_check.py [--json] [--data PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import gguf_factory  # noqa: E402
from gguf_factory import MoEShape  # noqa: E402
from mixrun.model.gguf import read_spec  # noqa: E402
from mixrun.model.spec import ModelSpec, with_tensors  # noqa: E402
from mixrun.planner import PlanRequest  # noqa: E402
from mixrun.planner.evaluate import Context  # noqa: E402
from mixrun.planner.memory import ModelFacts  # noqa: E402
from mixrun.planner.moe import best_placement, evaluate_moe  # noqa: E402
from mixrun.rig.profile import FORMAT, Device, Host, Link, RigProfile  # noqa: E402

DATA = ROOT / "docs" / "cost-model-data.toml"

# openai/gpt-oss-20b config.json: 24 layers, hidden 2880, 64 heads of 64, 8 KV heads, 32 local experts, 4 per token,
# intermediate 2880, vocab 201088, sliding window 128 on alternate layers.
GPT_OSS_20B = dict(n_layers=24, n_embd=2880, n_head=64, n_head_kv=8, head_dim=64, n_ff=2880, n_vocab=201088,
                   n_ctx=131072, tied=False, sliding_window=128,
                   moe=MoEShape(n_expert=32, n_expert_used=4, n_ff_exp=2880, expert_qtype="MXFP4"))
# deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct config.json: 27 layers, hidden 2048, 16 heads, MLA (kv_lora_rank 512,
# no q_lora, qk_nope 128 + qk_rope 64, v_head_dim 128), 64 routed experts of 1408, 6 per token, 2 shared, the first
# layer dense (intermediate 10944), vocab 102400. Its 1408-wide experts are not whole Q4_K blocks: Q4_0 (4.5 bits)
# stands in for the Q4_K_M file's mix.
DEEPSEEK_V2_LITE = dict(n_layers=27, n_embd=2048, n_head=16, n_head_kv=16, head_dim=192, n_ff=10944, n_vocab=102400,
                        n_ctx=163840, tied=False,
                        moe=MoEShape(n_expert=64, n_expert_used=6, n_ff_exp=1408, n_expert_shared=2, n_dense_lead=1,
                                     kv_lora_rank=512, rope_dim=64, v_head_dim=128))
MODELS = {  # row model prefix -> (arch, shape, qtype of the non-expert tensors)
    "Qwen3-30B-A3B": ("qwen3moe", gguf_factory.QWEN3_30B_A3B, "Q4_K_M"),
    "DeepSeek-Coder-V2-Lite": ("deepseek2", DEEPSEEK_V2_LITE, "Q4_0"),
    "gpt-oss-120b": ("gpt-oss", gguf_factory.GPT_OSS_120B, "BF16"),
    "gpt-oss-20b": ("gpt-oss", GPT_OSS_20B, "BF16"),
}
# name -> (VRAM GiB, GB/s, dense FP16 TFLOP/s with FP32 accumulate), datasheets
GPUS = {
    "RTX 2080 8GB": ("NVIDIA GeForce RTX 2080", 8.0, 448.0, 40.3),
    "RTX 3090": ("NVIDIA GeForce RTX 3090", 24.0, 936.0, 71.0),
    "RTX 3090 Ti": ("NVIDIA GeForce RTX 3090 Ti", 24.0, 1008.0, 80.0),
    "RTX PRO 6000 Blackwell Workstation Edition": ("NVIDIA RTX PRO 6000 Blackwell", 96.0, 1792.0, 250.0),
    # AMD (ROCm): RDNA3's WMMA matrix rate; RDNA2 has no matrix units, so its packed-FP16 vector rate
    "RX 7900 XT": ("AMD Radeon RX 7900 XT", 20.0, 800.0, 103.0),
    "RX 6900 XT": ("AMD Radeon RX 6900 XT", 16.0, 512.0, 46.1),
}
PCIE = {"RTX 2080 8GB": 12.0}  # X299 boards are PCIe 3.0 x16 (~12 GB/s achieved); others PCIe 4.0 x16 (25)
DEFAULT_HOST_GBS = 80.0  # used where the source does not say; such rows are not scored for decode


def _spec(model: str, folder: Path, cache: dict[str, ModelSpec]) -> ModelSpec | None:
    key = next((k for k in MODELS if model.startswith(k)), None)
    if key is None:
        return None
    if key not in cache:
        arch, shape, qtype = MODELS[key]
        path = gguf_factory.write_model(folder / f"{key}.gguf", arch, qtype=qtype, sparse=True, **shape)
        cache[key] = read_spec(path)
    return cache[key]


def _at_size(spec: ModelSpec, gib: float) -> ModelSpec:
    """The model with its non-expert matrices scaled so that the file is ``gib`` GiB (the published file quantizes
    them differently from the sparse stand-in; the experts' MXFP4/Q4_K bytes are kept)."""
    other = sum(t.n_bytes for t in spec.tensors if len(t.shape) >= 2 and not t.routed_expert)
    factor = max(0.05, 1 + (gib * (1 << 30) - spec.total_bytes) / other)
    return with_tensors(spec, [dataclasses.replace(t, n_bytes=int(t.n_bytes * factor))
                               if len(t.shape) >= 2 and not t.routed_expert else t for t in spec.tensors])


def _rig(row: dict) -> RigProfile:
    name = row["gpus"][0]
    full, vram, bw, tf = GPUS[name]
    host_bw = row.get("host_bw_gbs", DEFAULT_HOST_GBS)
    backend = "rocm" if full.startswith("AMD") else "cuda"  # the AMD rows ran llama.cpp's ROCm build
    devices = (Device(id="gpu0", host="h", backend=backend, name=full, vram_gib=vram, mem_bandwidth_gbs=bw,
                      fp16_tflops=tf),
               Device(id="cpu", host="h", backend="cpu", name=row.get("host_cpu", "host CPU"), vram_gib=256.0,
                      reserved_gib=8.0, mem_bandwidth_gbs=host_bw, fp16_tflops=1.0))
    pcie = PCIE.get(name, 25.0)
    return RigProfile(format=FORMAT, name="moe-row",
                      hosts=(Host(id="h", ram_gib=256.0, cpu_cores=row.get("cpu_threads", 16), pcie_gbs=pcie),),
                      devices=devices,
                      links=(Link(between=("gpu0", "cpu"), kind="pcie", bandwidth_gbs=pcie, latency_us=10.0),))


def evaluate(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    out, skipped = [], []
    cache: dict[str, ModelSpec] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, row in enumerate(rows):
            spec = _spec(row["model"], Path(tmp), cache)
            if spec is None or row["gpus"][0] not in GPUS or row.get("use") == "none":
                skipped.append({"row": i, "source": row["source"], "why": "not scored: " + row.get("notes", "")[:80]
                                if row.get("use") == "none" else "no shape or GPU for it"})
                continue
            if "model_gib" in row:
                spec = _at_size(spec, row["model_gib"])
            ub = row.get("ubatch", 512)
            req = PlanRequest(ctx=max(4096, row.get("n_prompt", 0) + 256), ubatch=ub,
                              prompt_tokens=row.get("n_prompt", 512))
            rig = _rig(row)
            ctx = Context(profile=rig, spec=spec, req=req, facts=ModelFacts(spec, req.kv_type))
            n = spec.n_layers if row["n_cpu_moe"] == "all" else int(row["n_cpu_moe"])
            on_cpu = [i for i in range(n) if spec.layer_expert_bytes[i]]
            ev = evaluate_moe(ctx, list(ctx.gpus), (spec.n_layers,), on_cpu)
            best = best_placement(ctx)
            r = {"row": i, "source": row["source"], "model": row["model"], "gpu": row["gpus"][0],
                 "flags": row["flags"], "use": row["use"],
                 "decode_measured": row.get("decode_tok_s"), "decode_predicted": round(1 / ev.decode.total_s, 2),
                 "prefill_measured": row.get("prefill_tok_s"),
                 "prefill_predicted": round(req.prompt_tokens / ev.prefill_s, 1),
                 "offload_pays_from_ubatch": ev.offload_ubatch,
                 "mixrun_choice": None if best is None else {
                     "experts_in_ram_layers": len(best.on_cpu),
                     "decode_tok_s": round(1 / best.evaluation.decode.total_s, 2), "fits": best.evaluation.fits}}
            for k in ("decode", "prefill"):
                m, p = r[f"{k}_measured"], r[f"{k}_predicted"]
                scored = row["use"] in (k, "both")
                r[f"{k}_ratio"] = round(p / m, 3) if (m and scored) else None
            out.append(r)
    return out, skipped


def summarise(results: list[dict]) -> dict:
    s = {}
    for k in ("decode", "prefill"):
        ratios = [r[f"{k}_ratio"] for r in results if r[f"{k}_ratio"]]
        if ratios:
            errs = [abs(math.log(x)) for x in ratios]
            s[k] = {"rows": len(ratios), "median_abs_error": round(math.exp(statistics.median(errs)) - 1, 3),
                    "worst_ratio": max(ratios, key=lambda x: abs(math.log(x)))}
    return s


def _cell(r: dict, k: str) -> str:
    return f"{r[f'{k}_predicted']:8.1f}" + ("" if r[f"{k}_ratio"] else "*")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args()
    rows = tomllib.loads(args.data.read_text()).get("moe", [])
    results, skipped = evaluate(rows)
    summary = summarise(results)
    if args.json:
        print(json.dumps({"results": results, "skipped": skipped, "summary": summary}, indent=1))
        return
    print(f"{'row':>3}  {'model':<28} {'GPU':<14} {'flags':<34} {'tg meas':>8} {'tg pred':>8} {'pp meas':>8} "
          f"{'pp pred':>8}  mixrun's own placement")
    for r in results:
        mine = r["mixrun_choice"]
        choice = (f"{mine['experts_in_ram_layers']} layers' experts in RAM, {mine['decode_tok_s']} tok/s"
                  if mine else "-")
        print(f"{r['row']:>3}  {r['model'][:28]:<28} {r['gpu'][:14]:<14} {r['flags'][:34]:<34} "
              f"{r['decode_measured'] or '':>8} {_cell(r, 'decode')} {r['prefill_measured'] or '':>8} {_cell(r, 'prefill')}"
              f"  {choice}")
    print("(* not scored: the source does not give what that prediction needs)")
    for k, v in summary.items():
        print(f"{k}: {v['rows']} rows, median |error| {v['median_abs_error']:.0%}, worst predicted/measured "
              f"x{v['worst_ratio']:.2f}")
    for s in skipped:
        print(f"skipped row {s['row']}: {s['why']}")


if __name__ == "__main__":
    main()
