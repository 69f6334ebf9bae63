"""Cost model vs published results: predict every usable row of docs/cost-model-data.toml with the planner.

For each published multi-GPU (or single-GPU baseline) measurement this builds a rig profile from datasheet figures,
a sparse GGUF of the model's shape scaled to the published file size, runs ``build_candidates`` and picks the
candidate matching the published split and backend:

- ``none``: the single-GPU candidate;
- ``layer``: llama.cpp's default split (by free memory), or mixrun's optimized ``-ts`` when the run used a
  hand-tuned ``--tensor-split``;
- ``row`` / ``tensor``: the llama.cpp row / tensor-parallel candidate over all the rig's GPUs (candidates are matched
  by split, backend and the GPUs they use, not by label, so a candidate over a subset of GPUs is never compared);
- vLLM tensor parallel: the torch backend with one TP group over all GPUs (evaluated directly, since the torch plan
  only forms TP groups over NVLink-class links). Its constants are targets for mixrun's own runtime, so these rows
  are reported but kept out of the headline (llama.cpp) summary.

Skipped: MoE models (bytes read per token are far below the file size), exllama rows (no exllama backend, and
prompts of 16K-107K tokens), decode measured over long real-traffic context, the superseded first 4-GPU
``-sm tensor`` build, and anything without a known shape or GPU. Prefill is compared only where the source states a
prompt of about 512 tokens (``--assume-pp512`` adds rows whose prompt length is not stated).

Errors are reported for all llama.cpp rows, then separately for the fitted rows and for the held-back check set
(rows with ``set = "check"``, which nothing may be fitted on), each broken down by split, by period (2023-24 vs
2025-26 builds: the row's ``period``, else the source's era), by vendor and by ggml backend (the row's ``gpu_api``,
else CUDA for NVIDIA and ROCm for AMD).

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
from datetime import date
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
    # AMD and Intel added 2026-12-04 (docs/cost-model-sources.md §14).
    # AMD: dense FP16 matrix rate (WMMA on RDNA3/4, MFMA on CDNA); RDNA1/2 and Vega have no matrix units, so their
    # packed-FP16 vector rate.
    "RX 7900 XTX": Gpu("AMD Radeon RX 7900 XTX", 24.0, 960.0, 122.8),
    "RX 7900 XT": Gpu("AMD Radeon RX 7900 XT", 20.0, 800.0, 103.0),
    "RX 6800 XT": Gpu("AMD Radeon RX 6800 XT", 16.0, 512.0, 41.5),
    "RX 6700 XT": Gpu("AMD Radeon RX 6700 XT", 12.0, 384.0, 26.4),
    "RX 5700 XT": Gpu("AMD Radeon RX 5700 XT", 8.0, 448.0, 19.5),
    "Radeon AI PRO R9700": Gpu("AMD Radeon AI PRO R9700", 32.0, 640.0, 191.0),
    "Instinct MI100": Gpu("AMD Instinct MI100", 32.0, 1228.8, 184.6),
    "Instinct MI50 32GB": Gpu("AMD Instinct MI50/MI60", 32.0, 1024.0, 26.5),
    "Instinct MI25": Gpu("AMD Radeon Instinct MI25", 16.0, 484.0, 24.6),
    "RTX 2080 Ti": Gpu("NVIDIA GeForce RTX 2080 Ti", 11.0, 616.0, 53.8),
    "RTX 2080 8GB": Gpu("NVIDIA GeForce RTX 2080", 8.0, 448.0, 40.3),
    "V100-PCIE-32GB": Gpu("Tesla V100-PCIE-32GB", 32.0, 900.0, 112.0),
    # Added 2026-12-04 with the fourth batch (docs/cost-model-sources.md §15): TechPowerUp / vendor datasheets.
    "RTX 3070 8GB": Gpu("NVIDIA GeForce RTX 3070", 8.0, 448.0, 40.6),
    "RTX 3080 Ti 12GB": Gpu("NVIDIA GeForce RTX 3080 Ti", 12.0, 912.4, 68.2),
    "RTX 3060 Ti 8GB": Gpu("NVIDIA GeForce RTX 3060 Ti", 8.0, 448.0, 32.4),
    "RTX 4070 Ti 12GB": Gpu("NVIDIA GeForce RTX 4070 Ti", 12.0, 504.2, 80.2),
    "RTX 4080 16GB": Gpu("NVIDIA GeForce RTX 4080", 16.0, 716.8, 97.5),
    "RTX 2060 6GB": Gpu("NVIDIA GeForce RTX 2060", 6.0, 336.0, 25.8),
    # GP100: no tensor cores, full-rate packed FP16.
    "Tesla P100 16GB": Gpu("Tesla P100-PCIE-16GB", 16.0, 732.2, 18.7),
    # Pascal GeForce: FP16 is crippled, so the FP32 rate.
    "GTX 1050 Ti 4GB": Gpu("NVIDIA GeForce GTX 1050 Ti", 4.0, 112.1, 2.14),
    "Instinct MI210": Gpu("AMD Instinct MI210", 64.0, 1638.4, 181.0),
    "Instinct MI300X": Gpu("AMD Instinct MI300X", 192.0, 5300.0, 1307.4),
    "Radeon PRO W7900": Gpu("AMD Radeon PRO W7900", 48.0, 864.0, 122.6),
    # One Vega 20 (gfx906) die of a Radeon Pro Vega II Duo: packed-FP16 vector rate.
    "Radeon Pro Vega II": Gpu("AMD Radeon Pro Vega II", 32.0, 1024.0, 28.3),
    # Intel: XMX FP16 (half the INT8 rate).
    "Arc Pro B60": Gpu("Intel(R) Arc(TM) Pro B60 Graphics", 24.0, 456.0, 98.0),
}


def vendor_of(gpu_name: str) -> str:
    """NVIDIA, AMD or Intel, from the driver's name (for the breakdown by vendor)."""
    if re.search(r"AMD|Radeon|Instinct", gpu_name):
        return "AMD"
    return "Intel" if "Intel" in gpu_name else "NVIDIA"


def row_vendor(r: dict) -> str:
    vendors = sorted({vendor_of(GPUS[g].name) for g in r["gpus"]})
    return "+".join(vendors)


# The data's "pcie" strings -> effective one-direction GB/s of the slowest GPU link (about 80% of the raw rate).
PCIE_GBS = {
    "3.0 x8": 6.3,
    "4.0 x16": 25.0,
    "4.0 x8": 12.6,
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
    "mistral-7b": dict(n_layers=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=32000),
    "mistral-small-24b": dict(n_layers=40, n_embd=5120, n_head=32, n_head_kv=8, head_dim=128, n_ff=32768,
                              n_vocab=131072),
    "llama32-1b": dict(n_layers=16, n_embd=2048, n_head=32, n_head_kv=8, head_dim=64, n_ff=8192, n_vocab=128256),
    "llama32-3b": dict(n_layers=28, n_embd=3072, n_head=24, n_head_kv=8, head_dim=128, n_ff=8192, n_vocab=128256),
    "tinyllama-1.1b": dict(n_layers=22, n_embd=2048, n_head=32, n_head_kv=4, n_ff=5632, n_vocab=32000),
    "qwen3-8b": dict(n_layers=36, n_embd=4096, n_head=32, n_head_kv=8, head_dim=128, n_ff=12288, n_vocab=151936),
}

# (regex on the model name, shape); first match wins.
MODEL_RULES: list[tuple[str, str]] = [
    (r"^Llama 3 8B", "llama3-8b"),
    (r"Llama 2 70B|Miqu", "llama2-70b"),
    (r"Llama[- ](3(\.\d)? )?70B|Llama 3\.\d 70B|Llama-70B", "llama3-70b"),
    (r"^LLaMA 7B|^Llama 2 7B", "llama1-7b"),
    (r"^LLaMA 13B|^Llama 2 13B", "llama1-13b"),
    (r"^Mistral 7B", "mistral-7b"),
    (r"^Mistral Small 3", "mistral-small-24b"),
    (r"^Llama 3\.2 1B", "llama32-1b"),
    (r"^Llama 3\.2 3B", "llama32-3b"),
    (r"^TinyLlama", "tinyllama-1.1b"),
    (r"^Qwen3 8B", "qwen3-8b"),
    (r"^LLaMA 3[03]B", "llama1-30b"),
    (r"^LLaMA 65B", "llama1-65b"),
    (r"Qwen3-14B", "qwen3-14b"),
    (r"Qwen3 32B|Qwen3-VL-32B", "qwen3-32b"),
    (r"Qwen3\.[568].27B", "qwen35-27b"),
    (r"Gemma 4 31B", "gemma-31b"),
]


def shape_of(model: str) -> str | None:
    return next((s for pat, s in MODEL_RULES if re.search(pat, model)), None)


def qtype_of(quant: str) -> str:
    """The factory qtype whose tensor mix stands in for the published quant (the size is then scaled to match)."""
    q = quant.upper()
    for k in ("BF16", "F16", "Q8_0", "Q4_0", "Q6_K"):
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


def gpu_api(r: dict) -> str:
    """The ggml backend of the run: the row's ``gpu_api``, else CUDA for NVIDIA, ROCm for AMD, Vulkan for Intel."""
    if r.get("gpu_api"):
        return r["gpu_api"]
    return {"AMD": "rocm", "Intel": "vulkan"}.get(row_vendor(r), "cuda")


def rig(r: dict) -> RigProfile:
    gpus = [GPUS[g] for g in r["gpus"]]
    api = gpu_api(r)
    devices = [Device(id=f"gpu{i}", backend=api, name=g.name, vram_gib=g.vram_gib, mem_bandwidth_gbs=g.bw_gbs,
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


def _gpus_used(c) -> frozenset[str]:
    return frozenset(d for g in c.groups for d in g.devices)


def pick(cands, r: dict):
    """The llama.cpp candidate with the published split over exactly the published GPUs (all of the rig's GPUs).

    Matched by split, backend and the devices the candidate uses, not by label, since labels name GPU subsets
    ("(all GPUs)", "(gpu0+gpu1)"). For layer split the label still tells llama.cpp's default split from mixrun's
    optimized ``-ts``; a run with a hand-tuned ``--tensor-split`` is compared with the optimized one."""
    split = r["split"]
    all_gpus = frozenset(f"gpu{i}" for i in range(len(r["gpus"])))
    same = [c for c in cands if c.backend.value == "llama.cpp" and c.split.value == split]
    on_all = [c for c in same if _gpus_used(c) == all_gpus] or [c for c in same if "cpu" not in _gpus_used(c)] or same
    if split == "layer":
        want = "optimized -ts" if TUNED_TS.search(r.get("notes", "")) else "default split"
        labelled = [c for c in on_all if want in c.label] or [c for c in same if want in c.label]
        return labelled[0] if labelled else None
    return on_all[0] if on_all else None


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


def row_period(r: dict) -> str:
    """"2023-24" or "2025-26": the row's ``period`` when it has one, else the source's era."""
    p = r.get("period")
    if p:
        return "2025-26" if re.search(r"2025|2026", p) else "2023-24"
    return era(r["source"])


# (date, llama.cpp build number) pairs the data's notes state together, for rows that give only a date.
BUILD_DATES = (("2024-01-07", 1786), ("2024-08-26", 3622), ("2025-02-12", 4696), ("2025-05-07", 5298),
               ("2025-09-30", 6645), ("2025-12-18", 7474), ("2026-08-30", 10639))
MONTHS = {m: i + 1 for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
                                          "Dec"))}


def row_build(r: dict) -> int | None:
    """The llama.cpp build a row ran: the number its notes give (llama-bench's "build: <commit> (N)", "bN"), else
    one interpolated from the date its notes or period give (BUILD_DATES); None for a 2025-26 row without either
    (the constants' own period) and for non-llama.cpp rows."""
    if r["backend"] != "llama.cpp":
        return None
    notes = r.get("notes", "")
    m = re.search(r"build:? *[0-9a-f]{6,}\s*\((\d{3,5})\)|\bb(\d{4,5})\b", notes)
    if m:
        return int(m.group(1) or m.group(2))
    m = re.search(r"\b(20\d\d)-(\d\d)(?:-(\d\d))?\b", notes)
    if m:
        day = date(int(m.group(1)), int(m.group(2)), int(m.group(3) or 15))
    elif m := re.search(r"\b(" + "|".join(MONTHS) + r")[a-z]* (20\d\d)\b", notes):
        day = date(int(m.group(2)), MONTHS[m.group(1)], 15)
    elif r.get("period"):
        day = date(int(r["period"][:4]), 6, 30)
    elif era(r["source"]) == "2023-24":
        day = date(2024, 1, 15)
    else:
        return None
    pts = [(date.fromisoformat(d), b) for d, b in BUILD_DATES]
    (d0, b0), (d1, b1) = next(((a, b) for a, b in zip(pts, pts[1:], strict=False) if day <= b[0]),
                               (pts[-2], pts[-1]))
    return max(1, round(b0 + (b1 - b0) * (day - d0).days / (d1 - d0).days))


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
            req = PlanRequest(ctx=4096, prompt_tokens=512, split=r["split"], llamacpp_build=row_build(r))
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
            out = {"row": i, "source": short_source(r["source"]), "era": row_period(r), "build": req.llamacpp_build,
                   "set": r.get("set", "fit"), "new": "set" in r, "batch": r.get("batch", 0),
                   "vendor": row_vendor(r), "api": gpu_api(r),
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
    n_in = sum(1 for x in ratios if 1 / 1.3 <= x <= 1.3)
    return {"n": len(ratios), "median_abs_log_ratio": round(med, 3), "median_error_pct": round(math.expm1(med) * 100, 1),
            "within_30pct": round(n_in / len(ratios), 3), "n_within_30pct": n_in,
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
                              "predicted": [a[f"{key}_predicted"], b[f"{key}_predicted"]], "correct": (m > 0) == (p > 0),
                              "set": "check" if "check" in (a["set"], b["set"]) else "fit"})
    n_ok = sum(p["correct"] for p in pairs)
    return {"pairs": len(pairs), "correct": n_ok, "share": round(n_ok / len(pairs), 3) if pairs else None,
            "detail": pairs}


SETS = ("fit", "check")
PERIODS = ("2023-24", "2025-26")
SPLITS = ("none", "layer", "row", "tensor")


def breakdown(rows: list[dict]) -> dict:
    """Decode and prefill errors of llama.cpp rows: all, and by split, by period, by vendor and by ggml backend."""
    def stats(metric: str, field: str | None = None, value: str | None = None) -> dict:
        return _stats([r[f"{metric}_ratio"] for r in rows
                       if f"{metric}_ratio" in r and (field is None or r[field] == value)])

    vendors = sorted({r["vendor"] for r in rows})
    apis = sorted({r["api"] for r in rows})
    return {metric: {"all": stats(metric),
                     "by_split": {s: stats(metric, "split", s) for s in SPLITS},
                     "by_period": {e: stats(metric, "era", e) for e in PERIODS},
                     "by_vendor": {v: stats(metric, "vendor", v) for v in vendors},
                     "by_api": {a: stats(metric, "api", a) for a in apis}}
            for metric in ("decode", "prefill")}


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
    # Fitted rows and the held-back check set (docs/cost-model-data.toml `set = "check"`), kept apart. A ranking
    # pair belongs to the check set when either of its rows does.
    out["by_set"] = {st: breakdown([r for r in llama if r["set"] == st]) for st in SETS}
    # The fitted rows added with the check set (they carry an explicit `set`): the like-for-like comparison.
    out["new_fit_rows"] = breakdown([r for r in llama if r["set"] == "fit" and r["new"]])
    # The fourth batch's check rows: held back by position and first predicted after the last model change, so
    # the one part of the check set no change to the model has seen.
    out["check_batch4"] = breakdown([r for r in llama if r["set"] == "check" and r["batch"] == 4])
    out["check_batch5"] = breakdown([r for r in llama if r["set"] == "check" and r["batch"] == 5])
    for key in ("decode", "prefill"):
        for st in SETS:
            pairs = [p for p in out[f"ranking_{key}"]["detail"] if (p["set"] == "check") == (st == "check")]
            ok = sum(p["correct"] for p in pairs)
            out["by_set"][st][f"ranking_{key}"] = {"pairs": len(pairs), "correct": ok,
                                                    "share": round(ok / len(pairs), 3) if pairs else None}
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


def _cell(s: dict) -> str:
    if not s.get("n"):
        return "-"
    return f"{s['n_within_30pct']}/{s['n']} ({s['within_30pct']:.0%}) med x{s['median_ratio']:.2f}"


def print_breakdown(summary: dict) -> None:
    """Fitted rows and check set side by side: within-30% count and median predicted/measured per slice."""
    fit, chk = summary["by_set"]["fit"], summary["by_set"]["check"]
    print("\nBy set (llama.cpp rows; cell = within 30% / n, median predicted/measured):")
    print(f"  {'slice':<24} {'fit decode':>24} {'check decode':>24} {'fit prefill':>24} {'check prefill':>24}")
    slices = [("all", lambda b: b["all"])]
    slices += [(f"split {s}", lambda b, s=s: b["by_split"][s]) for s in SPLITS]
    slices += [(f"period {e}", lambda b, e=e: b["by_period"][e]) for e in PERIODS]
    vendors = sorted(set(fit["decode"]["by_vendor"]) | set(chk["decode"]["by_vendor"]))
    slices += [(f"vendor {v}", lambda b, v=v: b["by_vendor"].get(v, {})) for v in vendors]
    apis = sorted(set(fit["decode"]["by_api"]) | set(chk["decode"]["by_api"]))
    slices += [(f"backend {a}", lambda b, a=a: b["by_api"].get(a, {})) for a in apis]
    for name, get in slices:
        print(f"  {name:<24} {_cell(get(fit['decode'])):>24} {_cell(get(chk['decode'])):>24} "
              f"{_cell(get(fit['prefill'])):>24} {_cell(get(chk['prefill'])):>24}")
    nf = summary["new_fit_rows"]
    print(f"  {'fitted rows added with it':<24} {_cell(nf['decode']['all']):>24} {'':>24} "
          f"{_cell(nf['prefill']['all']):>24}")
    b4 = summary["check_batch4"]
    print(f"  {'check rows of batch 4':<24} {'':>24} {_cell(b4['decode']['all']):>24} {'':>24} "
          f"{_cell(b4['prefill']['all']):>24}")
    b5 = summary["check_batch5"]
    print(f"  {'batch 5 (blind)':<24} {'':>24} {_cell(b5['decode']['all']):>24} {'':>24} "
          f"{_cell(b5['prefill']['all']):>24}")
    for key in ("decode", "prefill"):
        f, c = fit[f"ranking_{key}"], chk[f"ranking_{key}"]
        print(f"  ranking {key:<16} fit {f['correct']}/{f['pairs']}, check {c['correct']}/{c['pairs']}")


def print_report(results: list[dict], skipped: list[dict], summary: dict, elapsed: float) -> None:
    print(f"{'src':<16} {'rig':<24} {'model':<22} {'split':<6} {'dec meas':>8} {'pred':>7} {'ratio':>5}   "
          f"{'pp meas':>8} {'pred':>8} {'ratio':>5}")
    for r in results:
        dec = (f"{r['decode_measured']:8.2f} {r['decode_predicted']:7.2f} {r['decode_ratio']:5.2f}"
               if "decode_ratio" in r else f"{'':8} {'':7} {'':5}")
        pre = (f"{r['prefill_measured']:8.0f} {r['prefill_predicted']:8.0f} {r['prefill_ratio']:5.2f}"
               if "prefill_ratio" in r else "")
        tag = "*" if r["backend"] != "llama.cpp" else ("c" if r["set"] == "check" else "")
        print(f"{r['source'][:16]:<16} {r['rig'][:24]:<24} {r['model'][:22]:<22} {r['split'] + tag:<6} {dec}   {pre}")
    print("  (* vLLM row, predicted with mixrun's torch backend constants, which are targets; not in the summary;"
          " c: check-set row)")
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
    print_breakdown(summary)
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
