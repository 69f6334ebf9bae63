"""Cost model vs published results: predict every usable row of docs/cost-model-data.toml with the planner.

For each published multi-GPU (or single-GPU baseline) measurement this builds a rig profile from datasheet figures,
a sparse GGUF of the model's shape scaled to the published file size, runs ``build_candidates`` and picks the
candidate matching the published split and backend:

- ``none``: the single-GPU candidate;
- ``layer``: llama.cpp's default split (by free memory), or mixrun's optimized ``-ts`` when the run used a
  hand-tuned ``--tensor-split``;
- ``row`` / ``tensor``: the llama.cpp row / tensor-parallel candidate;
- vLLM tensor parallel: the torch backend with one TP group over all GPUs (evaluated directly, since the torch plan
  only forms TP groups over NVLink-class links). Its constants are targets for mixrun's own runtime, so these rows
  are reported but kept out of the headline (llama.cpp) summary.

Skipped: MoE models (bytes read per token are far below the file size), exllama rows (no exllama backend, and
prompts of 16K-107K tokens), decode measured over long real-traffic context, the superseded first 4-GPU
``-sm tensor`` build, and anything without a known shape or GPU. Prefill is compared only where the source states a
prompt of about 512 tokens (``--assume-pp512`` adds rows whose prompt length is not stated).

The planner is pure, so the numbers do not depend on the machine running this script.

Usage: python benchmarks/cost_model_check.py [--json] [--assume-pp512] [--data PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import gguf_factory  # noqa: E402
from mixrun.model.gguf import read_spec  # noqa: E402
from mixrun.model.spec import ModelSpec  # noqa: E402
from mixrun.planner import PlanRequest, build_candidates, scaled_spec  # noqa: E402
from mixrun.planner.evaluate import Context, evaluate_pipeline  # noqa: E402
from mixrun.planner.memory import ModelFacts  # noqa: E402
from mixrun.planner.search import kv_head_counts  # noqa: E402
from mixrun.planner.types import Group  # noqa: E402
from mixrun.rig.profile import FORMAT, Device, Host, Link, RigProfile  # noqa: E402

DATA = ROOT / "docs" / "cost-model-data.toml"
GIB = 1 << 30


# ---- datasheet GPUs ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gpu:
    name: str  # the driver's name: the cost model classifies devices by it (Pascal, datacenter, other)
    vram_gib: float
    bw_gbs: float
    tflops: float  # dense FP16 tensor with FP32 accumulate (GeForce: half the FP16-accumulate rate)
    nvlink_gbs: float = 56.25  # one direction, when the data says the pair is bridged


# Vendor datasheet figures. GeForce FP32-accumulate tensor rate is half the FP16-accumulate one; P40 has no tensor
# cores and llama.cpp runs it in FP32 (11.76 TF).
GPUS: dict[str, Gpu] = {
    "RTX 3090": Gpu("NVIDIA GeForce RTX 3090", 24.0, 936.0, 71.0),
    "RTX 3090 Ti": Gpu("NVIDIA GeForce RTX 3090 Ti", 24.0, 1008.0, 80.0),
    "RTX 3080 10GB": Gpu("NVIDIA GeForce RTX 3080", 10.0, 760.0, 59.5),
    "RTX 3060 12GB": Gpu("NVIDIA GeForce RTX 3060", 12.0, 360.0, 25.6),
    "RTX 2070 8GB": Gpu("NVIDIA GeForce RTX 2070", 8.0, 448.0, 29.9),
    "RTX 4090": Gpu("NVIDIA GeForce RTX 4090", 24.0, 1008.0, 165.2),
    "RTX 4070 Super": Gpu("NVIDIA GeForce RTX 4070 SUPER", 12.0, 504.0, 71.0),
    "RTX 5090": Gpu("NVIDIA GeForce RTX 5090", 32.0, 1792.0, 209.5),
    "RTX 5080 16GB": Gpu("NVIDIA GeForce RTX 5080", 16.0, 960.0, 112.6),
    "RTX 5060 Ti 16GB": Gpu("NVIDIA GeForce RTX 5060 Ti", 16.0, 448.0, 47.4),
    "RTX A6000": Gpu("NVIDIA RTX A6000", 48.0, 768.0, 154.8),
    "RTX A5000": Gpu("NVIDIA RTX A5000", 24.0, 768.0, 111.1),
    "RTX 6000 Ada": Gpu("NVIDIA RTX 6000 Ada Generation", 48.0, 960.0, 364.2),
    "RTX PRO 6000 Blackwell": Gpu("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", 96.0, 1792.0, 503.8),
    "Tesla P40": Gpu("Tesla P40", 24.0, 346.0, 11.76),
    "Tesla V100-SXM2-16GB": Gpu("Tesla V100-SXM2-16GB", 16.0, 900.0, 125.0, nvlink_gbs=50.0),
    # The Dec 2023 table does not say PCIe or SXM; the SXM figures are used, as for the NVLink rows.
    "A100 80GB": Gpu("NVIDIA A100-SXM4-80GB", 80.0, 2039.0, 312.0, nvlink_gbs=300.0),
    "A100 80GB PCIe": Gpu("NVIDIA A100 80GB PCIe", 80.0, 1935.0, 312.0, nvlink_gbs=300.0),
    "H100 PCIe 80GB": Gpu("NVIDIA H100 PCIe", 80.0, 2000.0, 756.0),
}

# The data's "pcie" strings -> effective one-direction GB/s of the slowest GPU link (about 80% of the raw rate).
PCIE_GBS = {
    "3.0 x8": 6.3,
    "4.0 x16": 25.0,
    "2.0 x1 (2070 on USB riser)": 0.4,
    "3.0 x16 + 3.0 x4 (eGPU)": 3.2,
    "top pair Gen3/4 x16, bottom pair x8": 6.3,
}

# ---- model shapes -------------------------------------------------------------------------------------------------

SHAPES: dict[str, dict] = {
    "llama1-7b": dict(n_layers=32, n_embd=4096, n_head=32, n_head_kv=32, n_ff=11008, n_vocab=32000),
    "llama1-13b": dict(n_layers=40, n_embd=5120, n_head=40, n_head_kv=40, n_ff=13824, n_vocab=32000),
    "llama1-30b": dict(n_layers=60, n_embd=6656, n_head=52, n_head_kv=52, n_ff=17920, n_vocab=32000),
    "llama1-65b": dict(n_layers=80, n_embd=8192, n_head=64, n_head_kv=64, n_ff=22016, n_vocab=32000),
    "llama2-70b": dict(n_layers=80, n_embd=8192, n_head=64, n_head_kv=8, n_ff=28672, n_vocab=32000),
    "llama3-8b": dict(n_layers=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256),
    "llama3-70b": {k: v for k, v in gguf_factory.LLAMA3_70B.items() if k not in ("n_ctx", "tied")},
    "qwen3-14b": dict(n_layers=40, n_embd=5120, n_head=40, n_head_kv=8, head_dim=128, n_ff=17408, n_vocab=151936),
    "qwen3-32b": dict(n_layers=64, n_embd=5120, n_head=64, n_head_kv=8, head_dim=128, n_ff=25600, n_vocab=151936),
    # Qwen3.5/3.8-27B: hybrid (3 of 4 layers linear attention) dense 27B, approximated as full attention.
    "qwen35-27b": dict(n_layers=64, n_embd=5120, n_head=24, n_head_kv=4, head_dim=256, n_ff=17408, n_vocab=248320),
    # Gemma 4 31B: approximated by a Gemma-3-27B-like shape without sliding windows.
    "gemma-31b": dict(n_layers=62, n_embd=5376, n_head=32, n_head_kv=16, head_dim=128, n_ff=21504, n_vocab=262144),
}

# (regex on the model name, shape); first match wins.
MODEL_RULES: list[tuple[str, str]] = [
    (r"^Llama 3 8B", "llama3-8b"),
    (r"Llama 2 70B|Miqu", "llama2-70b"),
    (r"Llama[- ](3(\.\d)? )?70B|Llama 3\.\d 70B|Llama-70B", "llama3-70b"),
    (r"^LLaMA 7B", "llama1-7b"),
    (r"^LLaMA 13B", "llama1-13b"),
    (r"^LLaMA 3[03]B", "llama1-30b"),
    (r"^LLaMA 65B", "llama1-65b"),
    (r"Qwen3-14B", "qwen3-14b"),
    (r"Qwen3 32B|Qwen3-VL-32B", "qwen3-32b"),
    (r"Qwen3\.[58].27B", "qwen35-27b"),
    (r"Gemma 4 31B", "gemma-31b"),
]


def shape_of(model: str) -> str | None:
    return next((s for pat, s in MODEL_RULES if re.search(pat, model)), None)


def qtype_of(quant: str) -> str:
    """The factory qtype whose tensor mix stands in for the published quant (the size is then scaled to match)."""
    q = quant.upper()
    for k in ("F16", "Q8_0", "Q4_0", "Q6_K"):
        if q.startswith(k):
            return k
    return "Q4_K_M"  # Q4_K_M, UD-Q4_K_XL, "Q4 (variant not stated)", AWQ int4


class SpecCache:
    """Sparse GGUFs written once per (shape, qtype), scaled per published file size."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.base: dict[tuple[str, str], ModelSpec] = {}

    def get(self, shape: str, qtype: str, model_gib: float | None) -> ModelSpec:
        key = (shape, qtype)
        if key not in self.base:
            path = gguf_factory.write_model(self.tmp / f"{shape}-{qtype}.gguf", "llama", qtype=qtype, sparse=True,
                                            tied=False, **SHAPES[shape])
            self.base[key] = read_spec(path)
        spec = self.base[key]
        if not model_gib:
            return spec
        matrix = sum(t.n_bytes for t in spec.tensors if len(t.shape) >= 2)
        rest = spec.total_bytes - matrix
        return scaled_spec(spec, (model_gib * GIB - rest) / matrix)


# ---- rigs ---------------------------------------------------------------------------------------------------------


def rig(r: dict) -> RigProfile:
    gpus = [GPUS[g] for g in r["gpus"]]
    devices = [Device(id=f"gpu{i}", backend="cuda", name=g.name, vram_gib=g.vram_gib, mem_bandwidth_gbs=g.bw_gbs,
                      fp16_tflops=g.tflops) for i, g in enumerate(gpus)]
    devices.append(Device(id="cpu", backend="cpu", name="host CPU", vram_gib=128.0, mem_bandwidth_gbs=50.0,
                          fp16_tflops=1.0))
    links = []
    if r["interconnect"] == "nvlink":
        links = [Link(between=(f"gpu{i}", f"gpu{j}"), kind="nvlink", bandwidth_gbs=gpus[i].nvlink_gbs,
                      latency_us=8.0) for i in range(len(gpus)) for j in range(i + 1, len(gpus))]
    pcie = PCIE_GBS.get(r.get("pcie", ""), 25.0)
    return RigProfile(format=FORMAT, name="x", hosts=(Host(id="h0", pcie_gbs=pcie),), devices=tuple(devices),
                      links=tuple(links))


# ---- selection ----------------------------------------------------------------------------------------------------


def skip_reason(r: dict) -> str | None:
    notes = r.get("notes", "")
    if "MoE" in notes or re.search(r"A\d+B|gpt-oss|GLM", r["model"]):
        return "MoE: bytes read per token far below the file size"
    if r["backend"].startswith("exllama"):
        return "exllama: no such backend in the planner; prefill of 16K-107K-token prompts only"
    if "real server traffic" in notes:
        return "decode averaged over real traffic at up to 262K context: depth unknown, likely long"
    if "First 4-GPU -sm tensor" in notes:
        return "first experimental 4-GPU -sm tensor build ('performance leaves a lot to be desired'), superseded"
    if any(g not in GPUS for g in r["gpus"]):
        return "GPU not in the datasheet table"
    if shape_of(r["model"]) is None:
        return "no model shape for this model"
    return None


TUNED_TS = re.compile(r"hand-tuned --tensor-split|Tuned --tensor-split")


def pick(cands, r: dict):
    split = r["split"]
    for c in cands:
        if c.backend.value != "llama.cpp" or c.split.value != split:
            continue
        if split == "layer":
            want = "optimized -ts" if TUNED_TS.search(r.get("notes", "")) else "default split"
            if want not in c.label:
                continue
        return c
    return None


def torch_tp(profile: RigProfile, spec: ModelSpec, req: PlanRequest) -> tuple[float, float, bool]:
    """vLLM TP over all GPUs as mixrun's torch backend would run it: one TP group, even KV-head shares."""
    ctx = Context(profile=profile, spec=spec, req=req, facts=ModelFacts(spec, req.kv_type))
    gpus = [d for d in profile.devices if d.backend != "cpu"]
    kv = kv_head_counts([1.0] * len(gpus), spec.n_head_kv, even=True)
    group = Group(tuple(d.id for d in gpus), (0, spec.n_layers), kv_heads=kv if (kv and len(gpus) > 1) else ())
    ev = evaluate_pipeline(ctx, "torch", [group])
    return 1.0 / ev.decode.total_s, req.prompt_tokens / ev.prefill_s, ev.fits


# ---- the run ------------------------------------------------------------------------------------------------------


def short_source(url: str) -> str:
    m = re.search(r"github\.com/([^/]+)/([^/]+)(?:/(pull|issues)/(\d+))?", url)
    if m:
        repo = m.group(2)[:14]
        return f"{repo}#{m.group(4)}" if m.group(4) else repo
    host = re.sub(r"^https?://", "", url).split("/")[0]
    return {"redlib.private.coffee": "r/LocalLLaMA", "peuqui.github.io": "AIfred", "ai-maestro.online": "ai-maestro",
            "ollama.linkworksinc.com": "linkworks"}.get(host, host)


# Sources whose numbers come from llama.cpp/vLLM builds of 2023 to mid-2024 (before CUDA graphs and the 2025 kernel
# work); everything else is a 2025-26 build.
OLD_BUILDS = ("XiongjieDai/", "llama.cpp/pull/4766", "llama.cpp/pull/2470", "llama.cpp/pull/6017",
              "llama.cpp/pull/7676", "ollama/pull/5527", "vllm/issues/6955")


def era(url: str) -> str:
    return "2023-24" if any(k in url for k in OLD_BUILDS) else "2025-26"


def rig_name(gpus: list[str]) -> str:
    out: list[str] = []
    for g in dict.fromkeys(gpus):
        n = gpus.count(g)
        out.append(f"{n}x {g}" if n > 1 else g)
    return " + ".join(out)


def evaluate(rows: list[dict], assume_pp512: bool) -> tuple[list[dict], list[dict]]:
    results, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cache = SpecCache(Path(tmp))
        for i, r in enumerate(rows):
            why = skip_reason(r)
            if why:
                skipped.append({"row": i, "source": short_source(r["source"]), "rig": rig_name(r["gpus"]),
                                "model": r["model"], "split": r["split"], "reason": why})
                continue
            n_prompt = r.get("n_prompt")
            pp_ok = r.get("prefill_tok_s") and (
                (n_prompt is not None and 256 <= n_prompt <= 1024) or (assume_pp512 and n_prompt is None))
            req = PlanRequest(ctx=4096, prompt_tokens=512, split=r["split"])
            spec = cache.get(shape_of(r["model"]), qtype_of(r["quant"]), r.get("model_gib"))
            profile = rig(r)
            vllm = r["backend"] == "vllm"
            if vllm:
                dec, pre, fits = torch_tp(profile, spec, req)
                label = "torch TP (all GPUs), standing in for vLLM"
            else:
                c = pick(build_candidates(profile, spec, req), r)
                if c is None:
                    skipped.append({"row": i, "source": short_source(r["source"]), "rig": rig_name(r["gpus"]),
                                    "model": r["model"], "split": r["split"],
                                    "reason": "the planner has no candidate for this split on this rig/model"})
                    continue
                dec, pre, fits, label = c.decode_tok_s, c.prefill_tok_s, c.fits, c.label
            out = {"row": i, "source": short_source(r["source"]), "era": era(r["source"]),
                   "rig": rig_name(r["gpus"]), "gpus": r["gpus"],
                   "model": r["model"], "quant": r["quant"], "split": r["split"],
                   "backend": "vllm->torch" if vllm else "llama.cpp", "candidate": label, "fits": fits}
            if r.get("decode_tok_s"):
                out.update(decode_measured=r["decode_tok_s"], decode_predicted=round(dec, 2),
                           decode_ratio=round(dec / r["decode_tok_s"], 3))
            if pp_ok:
                out.update(prefill_measured=r["prefill_tok_s"], prefill_predicted=round(pre, 1),
                           prefill_ratio=round(pre / r["prefill_tok_s"], 3), n_prompt=n_prompt or 512)
            if "decode_ratio" in out or "prefill_ratio" in out:
                results.append(out)
            else:
                skipped.append({"row": i, "source": out["source"], "rig": out["rig"], "model": r["model"],
                                "split": r["split"], "reason": f"prefill only, at n_prompt={n_prompt} (not ~512)"})
    return results, skipped


def _stats(ratios: list[float]) -> dict:
    if not ratios:
        return {"n": 0}
    logs = [abs(math.log(x)) for x in ratios]
    med = statistics.median(logs)
    return {"n": len(ratios), "median_abs_log_ratio": round(med, 3), "median_error_pct": round(math.expm1(med) * 100, 1),
            "within_30pct": round(sum(1 for x in ratios if 1 / 1.3 <= x <= 1.3) / len(ratios), 3),
            "median_ratio": round(statistics.median(ratios), 3)}


def ranking(results: list[dict], key: str) -> dict:
    """Pairs of results from the same source, rig and model with different split modes: does the prediction order
    them as the measurements do?"""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if f"{key}_ratio" in r:
            groups.setdefault((r["source"], tuple(r["gpus"]), r["model"], r["quant"], r["backend"]), []).append(r)
    pairs = []
    for rs in groups.values():
        for a_i, a in enumerate(rs):
            for b in rs[a_i + 1:]:
                if a["split"] == b["split"]:
                    continue
                m = a[f"{key}_measured"] - b[f"{key}_measured"]
                p = a[f"{key}_predicted"] - b[f"{key}_predicted"]
                pairs.append({"source": a["source"], "rig": a["rig"], "model": a["model"],
                              "a": a["split"], "b": b["split"], "measured": [a[f"{key}_measured"], b[f"{key}_measured"]],
                              "predicted": [a[f"{key}_predicted"], b[f"{key}_predicted"]], "correct": (m > 0) == (p > 0)})
    n_ok = sum(p["correct"] for p in pairs)
    return {"pairs": len(pairs), "correct": n_ok, "share": round(n_ok / len(pairs), 3) if pairs else None,
            "detail": pairs}


def summarise(results: list[dict]) -> dict:
    llama = [r for r in results if r["backend"] == "llama.cpp"]
    out: dict = {"decode": _stats([r["decode_ratio"] for r in llama if "decode_ratio" in r]),
                 "prefill": _stats([r["prefill_ratio"] for r in llama if "prefill_ratio" in r]),
                 "decode_by_split": {}, "prefill_by_split": {}}
    for s in ("none", "layer", "row", "tensor"):
        out["decode_by_split"][s] = _stats([r["decode_ratio"] for r in llama if r["split"] == s and "decode_ratio" in r])
        out["prefill_by_split"][s] = _stats([r["prefill_ratio"] for r in llama
                                             if r["split"] == s and "prefill_ratio" in r])
    for e in ("2023-24", "2025-26"):
        out[f"decode_{e}_builds"] = _stats([r["decode_ratio"] for r in llama if r["era"] == e and "decode_ratio" in r])
        out[f"prefill_{e}_builds"] = _stats([r["prefill_ratio"] for r in llama
                                              if r["era"] == e and "prefill_ratio" in r])
    out["decode_vllm_as_torch"] = _stats([r["decode_ratio"] for r in results
                                          if r["backend"] != "llama.cpp" and "decode_ratio" in r])
    out["ranking_decode"] = ranking(results, "decode")
    out["ranking_prefill"] = ranking(results, "prefill")
    worst = sorted((r for r in llama if "decode_ratio" in r), key=lambda r: -abs(math.log(r["decode_ratio"])))[:5]
    out["worst_decode"] = [{k: r[k] for k in ("row", "source", "rig", "model", "split", "decode_measured",
                                              "decode_predicted", "decode_ratio")} for r in worst]
    return out


def _fmt_stats(name: str, s: dict) -> str:
    if not s.get("n"):
        return f"  {name:<26} n=0"
    return (f"  {name:<26} n={s['n']:<3} median |log ratio| {s['median_abs_log_ratio']:.3f} "
            f"(~{s['median_error_pct']:.0f}% off)  within 30%: {s['within_30pct']:.0%}  median pred/meas "
            f"{s['median_ratio']:.2f}")


def print_report(results: list[dict], skipped: list[dict], summary: dict, elapsed: float) -> None:
    print(f"{'src':<16} {'rig':<24} {'model':<22} {'split':<6} {'dec meas':>8} {'pred':>7} {'ratio':>5}   "
          f"{'pp meas':>8} {'pred':>8} {'ratio':>5}")
    for r in results:
        dec = (f"{r['decode_measured']:8.2f} {r['decode_predicted']:7.2f} {r['decode_ratio']:5.2f}"
               if "decode_ratio" in r else f"{'':8} {'':7} {'':5}")
        pre = (f"{r['prefill_measured']:8.0f} {r['prefill_predicted']:8.0f} {r['prefill_ratio']:5.2f}"
               if "prefill_ratio" in r else "")
        tag = "*" if r["backend"] != "llama.cpp" else ""
        print(f"{r['source'][:16]:<16} {r['rig'][:24]:<24} {r['model'][:22]:<22} {r['split'] + tag:<6} {dec}   {pre}")
    print("  (* vLLM row, predicted with mixrun's torch backend constants, which are targets; not in the summary)")
    print(f"\nSkipped {len(skipped)} rows:")
    for s in skipped:
        print(f"  #{s['row']:<3} {s['source'][:16]:<16} {s['rig'][:26]:<26} {s['model'][:30]:<30} {s['split']:<6} "
              f"{s['reason']}")
    print("\nSummary, llama.cpp rows (ratio = predicted / measured):")
    print(_fmt_stats("decode, all", summary["decode"]))
    for s, st in summary["decode_by_split"].items():
        print(_fmt_stats(f"decode, {s}", st))
    print(_fmt_stats("prefill (pp~512), all", summary["prefill"]))
    for s, st in summary["prefill_by_split"].items():
        print(_fmt_stats(f"prefill, {s}", st))
    for e in ("2023-24", "2025-26"):
        print(_fmt_stats(f"decode, {e} builds", summary[f"decode_{e}_builds"]))
        print(_fmt_stats(f"prefill, {e} builds", summary[f"prefill_{e}_builds"]))
    print(_fmt_stats("decode, vLLM as torch", summary["decode_vllm_as_torch"]))
    for key in ("decode", "prefill"):
        rk = summary[f"ranking_{key}"]
        print(f"\nRanking ({key}): {rk['correct']}/{rk['pairs']} split-mode pairs ordered as measured"
              + (f" ({rk['share']:.0%})" if rk["pairs"] else ""))
        for p in rk["detail"]:
            print(f"  {'ok ' if p['correct'] else 'BAD'} {p['source'][:16]:<16} {p['rig'][:26]:<26} "
                  f"{p['model'][:22]:<22} {p['a']:>6} vs {p['b']:<6} measured {p['measured'][0]:g} vs "
                  f"{p['measured'][1]:g}, predicted {p['predicted'][0]:g} vs {p['predicted'][1]:g}")
    print("\nWorst 5 decode predictions:")
    for w in summary["worst_decode"]:
        print(f"  #{w['row']:<3} {w['source'][:16]:<16} {w['rig'][:26]:<26} {w['model'][:22]:<22} {w['split']:<6} "
              f"measured {w['decode_measured']:g}, predicted {w['decode_predicted']:g} (x{w['decode_ratio']:.2f})")
    print(f"\n{len(results)} rows compared, {len(skipped)} skipped, {elapsed:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print rows, skipped rows and summary as JSON")
    ap.add_argument("--assume-pp512", action="store_true",
                    help="also compare prefill of rows whose prompt length is not stated, as if it were 512")
    ap.add_argument("--data", type=Path, default=DATA, help="the TOML of published results")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = tomllib.loads(args.data.read_text())["result"]
    results, skipped = evaluate(rows, args.assume_pp512)
    summary = summarise(results)
    elapsed = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"results": results, "skipped": skipped, "summary": summary,
                          "seconds": round(elapsed, 2)}, indent=1))
    else:
        print_report(results, skipped, summary, elapsed)


if __name__ == "__main__":
    main()
