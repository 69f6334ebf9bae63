"""Predicted decode and prefill time of a candidate, per backend. Every constant is documented, with its source,
in docs/cost-model.md; the figures a profile's ``[[results]]`` recorded replace predictions where present, and the
rig's ``[[corrections]]`` (fitted from them: :func:`fit_corrections`) rescale the rest.

Decode, one sequence (memory-bound): a token walks the pipeline stages in turn. A stage costs its slowest
device's bytes read over that device's bandwidth times an efficiency, plus a fixed launch cost per layer;
a TP group adds two collectives per layer (latency plus bytes over the group's slowest link); a hand-off between
stages costs the link's latency plus the hidden state's bytes; each token pays a fixed overhead.
Prefill (compute-bound), per ubatch: FLOPs over the device's matmul rate times the backend's efficiency times the
weights' quant-type factor, attention's score traffic when flash attention is off, a fixed cost per layer, and
the split's communication (row: every matrix's input and output rows cross the bus; tensor: two all-reduces of
ubatch x n_embd per layer); stages overlap when the backend pipelines micro-batches.
The constants' class is the device's backend (CUDA, ROCm, Vulkan, Metal, CPU) and product line.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, replace

from mixrun.rig.profile import Correction, Device, Result, RigProfile


@dataclass(frozen=True)
class BackendCosts:
    """Efficiency constants of one backend on one class of device (see docs/cost-model.md for each source)."""

    bw_eff: float  # share of the memory bandwidth decode achieves on the weights
    layer_overhead_s: float  # fixed cost per layer per token (kernel launches, synchronisation)
    token_overhead_s: float  # fixed cost per token (graph build, sampling, host round trip)
    prefill_eff: float  # share of the profile's fp16_tflops (dense, FP32 accumulate) prefill matmuls achieve
    stage_overhead_s: float = 0.0  # extra cost per pipeline boundary per token (scheduler copies, syncs)
    row_sync_fast_s: float = 0.0  # llama.cpp -sm row: synchronisation per layer over NVLink
    row_sync_slow_s: float = 0.0  # ... and over PCIe
    pipelined_prefill: bool = False
    prefill_layer_s: float = 0.0  # fixed cost per layer per ubatch in prefill (launches, syncs; small models)
    allreduce_extra_s: float = 0.0  # extra fixed cost per all-reduce on this backend (e.g. Vulkan's host staging)
    pcie_stall_s: float = 0.0  # extra per GPU-to-GPU copy or all-reduce over PCIe (ROCm without peer access)

    def prefill_fixed_s(self, n_layers: int, n_micro: int) -> float:
        """Prefill's fixed cost for ``n_layers`` layers over ``n_micro`` ubatches (at least a decode step's)."""
        return max(self.layer_overhead_s, self.prefill_layer_s) * n_layers * n_micro


# Calibrated on published llama-bench, vLLM and exllama figures: docs/cost-model.md gives each constant's source.
# llama.cpp constants describe builds of 2025-26 (b5000-b8xxx: CUDA graphs, MMQ int8 kernels, flash attention on
# by default); 2023-24 rows were weighted half in choosing them and are over-predicted by ~10% for decode.
# The torch GPU figures are targets for mixrun's own runtime (fused GGUF dequant-matmul kernels, CUDA graphs), not
# yet measured; a profile's recorded results replace every prediction they cover.
_LCPP_GPU = BackendCosts(bw_eff=0.85, layer_overhead_s=20e-6, token_overhead_s=0.4e-3, prefill_eff=1.05,
                         stage_overhead_s=150e-6, row_sync_fast_s=75e-6, row_sync_slow_s=400e-6,
                         pipelined_prefill=True, prefill_layer_s=60e-6)
COSTS: dict[tuple[str, str], BackendCosts] = {
    ("llama.cpp", "gpu"): _LCPP_GPU,
    # RTX A-series / PRO / Quadro: their datasheet FP16 rate is not halved like GeForce's, llama.cpp reaches half
    ("llama.cpp", "workstation"): replace(_LCPP_GPU, prefill_eff=0.425),
    ("llama.cpp", "pascal"): replace(_LCPP_GPU, bw_eff=0.73, layer_overhead_s=100e-6, prefill_eff=0.9,
                                     row_sync_slow_s=300e-6, prefill_layer_s=100e-6),
    # Tesla P100 (sm_60): no __dp4a, so llama.cpp's quantized matrix-vector kernels emulate it and decode is
    # compute-bound: a 3060 + P100 layer split of Qwen3.8-27B Q4_K_M decodes at 13.8 tok/s (fitted row), which puts
    # the P100's share at ~0.3 of its bandwidth. Prefill takes the dequantize + cuBLAS path (matmul_path).
    ("llama.cpp", "p100"): replace(_LCPP_GPU, bw_eff=0.3, layer_overhead_s=100e-6, prefill_eff=0.9,
                                   row_sync_slow_s=300e-6, prefill_layer_s=100e-6),
    ("llama.cpp", "datacenter"): replace(_LCPP_GPU, bw_eff=0.70, layer_overhead_s=60e-6, prefill_eff=0.35),
    # Apple GPUs: no published multi-device data in docs/cost-model-data.toml; the GeForce constants as a prior.
    ("llama.cpp", "metal"): _LCPP_GPU,
    # ROCm (HIP) on AMD cards with matrix units: 2025-26 rows of MI100, R9700 and 7900 XTX decode at 0.64 of the
    # bandwidth. RDNA3/4 (WMMA) multiply a ubatch with MMQ at 0.32 of the datasheet matrix rate (R9700 Q4_0 and
    # UD-Q4_K_XL pp512); CDNA1/2 (MFMA) dequantize K-quants and Q8_0 for hipBLAS (matmul_path), whose F16 GEMM
    # reaches 0.32 of it too (2x MI100 Q8_0 pp512 at 0.25, through BLAS_DEQUANT_FACTOR).
    ("llama.cpp", "rocm-matrix"): replace(_LCPP_GPU, bw_eff=0.64, prefill_eff=0.32),
    ("llama.cpp", "rocm-cdna"): replace(_LCPP_GPU, bw_eff=0.64, prefill_eff=0.32),
    # ROCm on RDNA1/2 and GCN/Vega (no matrix units; their fp16_tflops is the packed vector rate): MI50 Q4_0
    # prefill 0.58 of it; decode as rocm-matrix (no fitted row of its own). Between two such cards on PCIe a copy
    # stalls: issue 17's RX 6800 + RX 6700 XT decode a 3B F16 at 25 tok/s split by layer against 57 on the 6800
    # alone, ~16 ms per token at the one boundary. Each -sm tensor all-reduce over PCIe takes the same path and is
    # assumed to pay the same. Over an Infinity Fabric link (profile link kind other than pcie) it does not: four
    # Vega 20 dies of two Radeon Pro Vega II Duo on xGMI decode a 27B by -sm tensor at 51 tok/s.
    ("llama.cpp", "rocm"): replace(_LCPP_GPU, bw_eff=0.64, prefill_eff=0.58, pcie_stall_s=16e-3),
    # GCN gfx906/gfx900 (MI50/MI60, Radeon VII, Radeon Pro Vega II, MI25): the fitted 2025-26 decode rows of one
    # die (MI50 Llama 2 7B Q4_0, Vega II Qwen3.8-27B Q6_K, four Vega II dies on xGMI) run 1.42-1.56x under the
    # 0.64 above, so 0.43; the PCIe stall between two MI50s fitted on the same pair's Qwen3-14B Q4_0 layer split
    # with that (36.5 tok/s): ~6 ms (BF16's decode on the pair reads faster than either says). Each -sm tensor
    # all-reduce over xGMI costs ~30 us more than CUDA's: the four Vega II dies' Q4_0 and Q6_K decode (fitted rows)
    # are 1.27x and 1.18x over without it.
    ("llama.cpp", "rocm-gcn"): replace(_LCPP_GPU, bw_eff=0.43, prefill_eff=0.58, pcie_stall_s=6e-3,
                                       allreduce_extra_s=30e-6),
    # Vulkan on AMD: 7900 XTX / 7900 XT / 5700 XT 2025-26 rows decode at ~0.70 of the bandwidth and prefill at
    # ~0.3 of the matrix or vector rate (2024 builds lower still); each all-reduce of -sm tensor costs ~15 us more.
    ("llama.cpp", "vulkan-amd"): replace(_LCPP_GPU, bw_eff=0.70, prefill_eff=0.32, allreduce_extra_s=15e-6),
    # Vulkan on Intel Arc (B60): one fitted row (2x B60 -sm tensor, 1B Q8_0); decode as Vulkan on AMD. Its
    # all-reduce is staged through the host (~150 us each), its prefill reaches ~0.2 of the XMX FP16 rate.
    ("llama.cpp", "vulkan-intel"): replace(_LCPP_GPU, bw_eff=0.70, prefill_eff=0.13, allreduce_extra_s=150e-6,
                                           prefill_layer_s=150e-6),
    ("llama.cpp", "cpu"): BackendCosts(bw_eff=0.60, layer_overhead_s=250e-6, token_overhead_s=0.5e-3,
                                       prefill_eff=1.0),
    ("torch", "gpu"): BackendCosts(bw_eff=0.85, layer_overhead_s=30e-6, token_overhead_s=1.0e-3, prefill_eff=0.6,
                                   stage_overhead_s=50e-6, pipelined_prefill=True),
    ("torch", "pascal"): BackendCosts(bw_eff=0.60, layer_overhead_s=100e-6, token_overhead_s=1.0e-3,
                                      prefill_eff=0.6, stage_overhead_s=50e-6, pipelined_prefill=True),
    ("torch", "workstation"): BackendCosts(bw_eff=0.85, layer_overhead_s=30e-6, token_overhead_s=1.0e-3,
                                           prefill_eff=0.3, stage_overhead_s=50e-6, pipelined_prefill=True),
    ("torch", "datacenter"): BackendCosts(bw_eff=0.85, layer_overhead_s=30e-6, token_overhead_s=1.0e-3,
                                          prefill_eff=0.5, stage_overhead_s=50e-6, pipelined_prefill=True),
    # CPU: measured against llama.cpp in one run (benchmarks/torch_vs_llamacpp.py, docs/cost-model.md)
    ("torch", "cpu"): BackendCosts(bw_eff=0.60, layer_overhead_s=250e-6, token_overhead_s=0.5e-3, prefill_eff=0.5),
}
# One all-reduce: a fixed launch cost plus hops of the slowest link's latency, plus the bytes. mixrun's torch
# backend, like vLLM's one-shot all-reduce for small messages, takes 2 hops; llama.cpp's -sm tensor (its CUDA
# AllReduce or NCCL's low-latency protocol) 2 on two GPUs plus half a hop per further GPU: a 4-GPU ring's 6 hops
# made a 1B model's tensor split slower than its layer split on four 4090s, where it measures 1.3x faster.
# 2 GPUs over PCIe (10 us) give 35 us, about the 75 us per layer (two all-reduces) llama.cpp -sm tensor measures.
ALLREDUCE_BASE_S = 15e-6
_PASCAL = ("P40", "P100", "P4 ", "P6000", "GTX 10", "TITAN X", "TITAN Xp")
_WORKSTATION = ("RTX A", "RTX PRO", "Quadro", "Ada Generation", "RTX 6000", "RTX 5000", "RTX 4000")
_DATACENTER = ("A100", "A800", "H100", "H800", "H200", "GH200", "B200", "B100", "V100")
# AMD architectures, by the names their drivers print. RDNA3/4 (WMMA) and CDNA (MFMA) have matrix units, and their
# fp16_tflops is a matrix rate; the others' is the packed-FP16 vector rate.
_AMD_RDNA4 = ("RX 90", "RX 9070", "RX 9060", "R9700", "R9600")
_AMD_RDNA3 = ("RX 7", "W7", "Radeon 8", "780M", "890M")
_AMD_CDNA3 = ("MI300", "MI308", "MI325", "MI35")
_AMD_CDNA = ("MI100", "MI210", "MI250")
_AMD_GCN = ("MI50", "MI60", "Radeon VII", "Vega II", "Pro VII", "Vega 20")  # gfx906, int8 dot products
_AMD_VEGA10 = ("MI25", "Vega 56", "Vega 64", "Vega Frontier", "WX 9100")  # gfx900: no int8 dot products
_AMD = ("AMD", "Radeon", "Instinct")

# Prefill matmul throughput per quant type, relative to F16/Q8_0/Q4_0, on MMQ's int8 tensor/matrix-core kernels
# (and, lacking better, Vulkan, Metal and the CPU): JohannesGaessler's per-type llama-bench tables of Llama 3 8B at
# ubatch 512-1024 in llama.cpp PRs #8062, #8416, #8495 and #24127 (RTX 3090/4090/5090): K-quants 0.9-1.05 of the
# legacy types (Q6_K 0.925 of Q4_K_S, Q3_K_S 0.89, Q5_K_S 0.92), Q2_K 0.77, Q5_1 0.93 of Q5_0, i-quants 0.89-1.0.
# F32 weights run at the FP32 rate.
QUANT_PREFILL = {"F32": 0.5, "F16": 1.0, "BF16": 1.0, "Q8_0": 1.0, "Q4_0": 1.0, "Q4_1": 1.0, "Q5_0": 0.95,
                 "Q5_1": 0.92, "Q2_K": 0.77, "Q3_K": 0.87, "Q4_K": 0.97, "Q5_K": 0.92, "Q6_K": 0.9}
QUANT_PREFILL_OTHER = 0.92  # i-quants and anything else
# The same on int8 dot products (dp4a MMQ), where unpacking a K-quant's scales weighs more next to the dot products.
# Pascal (P40; PRs #2596, #4766, #8495, #24127): Q4_K_S 0.93, Q6_K 0.87, Q3_K_S 0.63, Q5_0 0.92-0.94, Q2_K 0.83,
# i-quants 0.86-0.93. AMD GCN and RDNA1/2 (MI50/MI60 in #27841, RX 6800 in #8416/#8495/#24127, Radeon Pro Vega II
# fitted rows in docs/cost-model-data.toml): Q4_K_S 0.73, Q5_0/Q5_1 0.81-0.93, Q3_K_S 0.75, Q6_K 0.58-0.64,
# i-quants 0.82-0.96. Q8_0 on dp4a: not measured, 0.9 assumed.
QUANT_PREFILL_DP4A = {"Q8_0": 0.9, "Q4_0": 1.0, "Q4_1": 1.0, "Q5_0": 0.93, "Q5_1": 0.93, "Q2_K": 0.83,
                      "Q3_K": 0.63, "Q4_K": 0.93, "Q5_K": 0.9, "Q6_K": 0.87}
QUANT_PREFILL_DP4A_AMD = {"Q8_0": 0.9, "Q4_0": 1.0, "Q4_1": 1.0, "Q5_0": 0.83, "Q5_1": 0.85, "Q2_K": 0.6,
                          "Q3_K": 0.75, "Q4_K": 0.73, "Q5_K": 0.7, "Q6_K": 0.6}
QUANT_PREFILL_DP4A_OTHER = 0.85
# BF16 on hardware without BF16 arithmetic (NVIDIA before Ampere, AMD GCN and RDNA1/2): converted on the fly.
# Fitted row 2x MI50 Qwen3-14B BF16 pp512 at 0.21 of the same pair's Q4_0; PR #14624's MUL_MAT n=512 BLAS-path
# table 0.14 of Q4_0.
BF16_EMULATED = 0.2
_TURING = ("RTX 20", "TITAN RTX", "Quadro RTX", "Tesla T4", "GTX 16")
_FLOAT_TYPES = ("F32", "F16", "BF16")


def amd_arch(name: str) -> str:
    """An AMD GPU's architecture as llama.cpp's HIP kernels tell them apart: ``rdna4``, ``rdna3``, ``cdna3``,
    ``cdna`` (CDNA1/2), ``vega10`` (gfx900), or ``dp4a`` (GCN gfx906 and RDNA1/2: int8 dot products, no matrix
    units)."""
    for arch, keys in (("rdna4", _AMD_RDNA4), ("rdna3", _AMD_RDNA3), ("cdna3", _AMD_CDNA3), ("cdna", _AMD_CDNA),
                       ("vega10", _AMD_VEGA10)):
        if any(k in name for k in keys):
            return arch
    return "dp4a"


# llama.cpp builds from which a kernel choice holds (build numbers as `llama-server --version` prints them):
# PR #8075 (2024-06-24, about b3210) made CUDA GPUs with int8 tensor cores multiply ubatches with MMQ instead of
# dequantizing for cuBLAS; before it, every quantized ubatch of more than 32 tokens went through cuBLAS on Volta
# and newer. Vulkan's 2024 shaders prefilled slower than 2025-26 builds on the same cards (fitted rows: RX 6700 XT
# and RX 6800 XT of Jan-Mar 2024, pp512 1.41x and 1.18x over-predicted); no 2024 row after March says when
# that changed, so builds before 2025 (about b4400) take EARLY_VULKAN_PREFILL.
MMQ_DEFAULT_BUILD = 3210
# Those builds' cuBLAS prefill on Volta and newer, F16 included, ran at this share of 2025-26 builds' rate: 1 / the
# median predicted/measured (1.167) of the 25 fitted CUDA pp512 rows of builds before b3210 once quantized
# matrices take the dequantize + cuBLAS path (P40 rows, on MMQ already, excluded).
OLD_CUBLAS_PREFILL = 0.86
EARLY_VULKAN_BUILD = 4400
EARLY_VULKAN_PREFILL = 0.77
# PR #14624 (2025-07, about b6000) gave CDNA3 (MI300) MMQ on its matrix cores; before it a ubatch went through
# rocBLAS, which "performs very poorly on CDNA3" (ggml_cuda_should_use_mmq's comment): the fitted rows of one MI300X
# on b3891 (Llama 2 7B Q4_0 pp512 1334 and 1272 tok/s) are about 19x below the rocm-cdna rate of a dequantized
# matrix, so CDNA3_ROCBLAS = 0.052 of it on those builds (the two rows' geometric mean).
CDNA3_MMQ_BUILD = 6000
CDNA3_ROCBLAS = 0.052
# Before CUDA graphs (PR #6766, 2024-05-08, about b2780) a decode step paid kernel launches and synchronisation
# per layer on every GPU backend: the fitted decode rows of builds from 2023 to April 2024 (RTX 3090/3090 Ti/A6000/
# A100/H100 LLaMA 7B Q4_0, RTX 2060, MI50, W7900, RX 6700 XT on Vulkan) ran at 0.5-0.76x of what 2025-26 constants say,
# which this extra cost per layer brings to a median 1.0 (docs/cost-model.md).
GRAPHS_BUILD = 2780
OLD_BUILD_LAYER_S = 80e-6
# Dequantize + F16 GEMM: a quantized matrix multiplies at this share of an F16 matrix's rate (the dequantization
# pass and its F16 copy). Median of six same-source quantized / F16 pp512 pairs of CUDA builds before PR #8075,
# fitted rows only (docs/cost-model.md): 0.72, 0.91, 0.76, 0.80, 0.79, 0.69.
BLAS_DEQUANT_FACTOR = 0.78


def matmul_path(device: Device, qtype: str, build: int | None = None) -> str:
    """Which llama.cpp kernel multiplies a 512-token ubatch with a ``qtype`` matrix on ``device``:

    - ``mma``: MMQ on int8 tensor or matrix cores (NVIDIA Turing and newer, RDNA3/4, CDNA3 from
      :data:`CDNA3_MMQ_BUILD`; CDNA1/2 for the legacy 4/5-bit types);
    - ``dp4a``: MMQ on int8 dot products (Pascal; GCN gfx906 such as the MI50; RDNA1/2);
    - ``blas``: dequantize to F16, then cuBLAS/hipBLAS (V100; P100, which has no ``__dp4a``; Vega 10; CDNA1/2
      for K-quants and Q8_0; RDNA3 for Q6_K and Q2_K; CUDA builds before :data:`MMQ_DEFAULT_BUILD`); F16/BF16/F32
      matrices always;
    - ``vulkan``, ``metal``, ``cpu``: that backend's own kernels.

    From ``ggml_cuda_should_use_mmq`` (ggml/src/ggml-cuda/mmq.cu, llama.cpp of 2026-10 as llama-cpp-python 0.3.36
    vendors it) for a ubatch above its small-batch thresholds (64 to 256 tokens)."""
    if device.backend in ("vulkan", "metal", "cpu"):
        return device.backend
    if qtype in _FLOAT_TYPES:
        return "blas"
    name = device.name + " "
    if device_class(device).startswith("rocm"):
        arch = amd_arch(name)
        if arch == "cdna3":
            return "blas" if build is not None and build < CDNA3_MMQ_BUILD else "mma"
        if arch == "rdna4":
            return "mma"
        if arch == "rdna3":
            return "blas" if qtype in ("Q6_K", "Q2_K") else "mma"
        if arch == "cdna":
            return "mma" if qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1") else "blas"
        return "blas" if arch == "vega10" else "dp4a"
    if any(k in name for k in _PASCAL) and "P100" not in name:
        return "dp4a"  # MMQ on __dp4a has been Pascal's default since PR #2683 (2023-08)
    if any(k in name for k in ("V100", "P100")) or (build is not None and build < MMQ_DEFAULT_BUILD):
        return "blas"
    return "mma"


def has_bf16(device: Device) -> bool:
    """Whether the GPU multiplies BF16 in hardware (NVIDIA from Ampere on, AMD RDNA3/4 and CDNA); CPUs are
    counted as able (llama.cpp converts there at a cost its CPU constants already carry)."""
    if device.backend == "cpu":
        return True
    name = device.name + " "
    if any(k in name for k in _AMD):
        return amd_arch(name) not in ("dp4a", "vega10")
    return not any(k in name for k in (*_PASCAL, *_TURING, "V100"))


def prefill_type_factor(device: Device, qtype: str, backend: str = "llama.cpp", build: int | None = None) -> float:
    """A ``qtype`` matrix's prefill matmul rate relative to the device class's rate (``prefill_eff``): in
    llama.cpp by the kernel :func:`matmul_path` picks, Vulkan builds before :data:`EARLY_VULKAN_BUILD` at
    :data:`EARLY_VULKAN_PREFILL` of today's; in mixrun's torch backend by :data:`QUANT_PREFILL`."""
    if backend != "llama.cpp":
        return QUANT_PREFILL.get(qtype, QUANT_PREFILL_OTHER)
    path = matmul_path(device, qtype, build)
    if qtype == "BF16" and not has_bf16(device):
        f = BF16_EMULATED
    elif path == "blas":
        f = 0.5 if qtype == "F32" else 1.0 if qtype in _FLOAT_TYPES else BLAS_DEQUANT_FACTOR
    elif path == "dp4a":
        table = QUANT_PREFILL_DP4A_AMD if device_class(device) in ("rocm", "rocm-gcn") else QUANT_PREFILL_DP4A
        f = table.get(qtype, QUANT_PREFILL_DP4A_OTHER)
    else:
        f = QUANT_PREFILL.get(qtype, QUANT_PREFILL_OTHER)
    if build is not None and path == "vulkan" and build < EARLY_VULKAN_BUILD:
        f *= EARLY_VULKAN_PREFILL
    if build is not None and path == "blas" and device.backend == "cuda" and build < MMQ_DEFAULT_BUILD:
        f *= OLD_CUBLAS_PREFILL
    if build is not None and build < CDNA3_MMQ_BUILD and path == "blas" and amd_arch(device.name) == "cdna3":
        f *= CDNA3_ROCBLAS
    return f


def device_class(device: Device) -> str:
    """The constants' class of a device: its backend, and for CUDA its product line."""
    if device.backend == "cpu":
        return "cpu"
    name = device.name + " "
    if device.backend == "metal":
        return "metal"
    amd = any(k in name for k in _AMD)
    if device.backend == "rocm" or (amd and device.backend != "vulkan"):
        arch = amd_arch(name)
        if arch in ("cdna", "cdna3"):
            return "rocm-cdna"
        if arch in ("rdna3", "rdna4"):
            return "rocm-matrix"
        return "rocm-gcn" if arch == "vega10" or any(k in name for k in _AMD_GCN) else "rocm"
    if device.backend == "vulkan" and amd:
        return "vulkan-amd"
    if device.backend == "vulkan" and "Intel" in name:
        return "vulkan-intel"
    if "P100" in name:
        return "p100"
    if any(k in name for k in _PASCAL):
        return "pascal"
    if any(k in name for k in _DATACENTER):
        return "datacenter"
    if any(k in name for k in _WORKSTATION) and "GeForce" not in name:
        return "workstation"
    return "gpu"


# Vulkan on an NVIDIA card: its CUDA class's constants at these shares. Fitted on the 14 decode and 10 prefill rows
# of Vulkan on GeForce cards in docs/cost-model-data.toml (fit set; RTX 3090/4070 Ti/4080/4090/5090, 2025-26),
# over-predicted by a median 1.19x and 1.33x with CUDA's constants; the same-source Vulkan/CUDA pp512 pairs say
# the same (RTX 4070 Ti 0.77, RTX 3090 0.84-0.88).
VULKAN_NVIDIA_BW = 0.84
VULKAN_NVIDIA_PREFILL = 0.75
_NVIDIA_CLASSES = ("gpu", "pascal", "p100", "datacenter", "workstation")


def costs(backend: str, device: Device) -> BackendCosts:
    """The constants of ``backend`` on ``device``; a class a backend has no figures for takes its GeForce ones."""
    cls = device_class(device)
    return _costs(backend, cls, device.backend == "vulkan" and cls in _NVIDIA_CLASSES)


@functools.cache  # COSTS is read once per key: the layer search asks for these constants in its inner loops
def _costs(backend: str, cls: str, vulkan_on_nvidia: bool) -> BackendCosts:
    c = COSTS.get((backend, cls)) or COSTS[(backend, "cpu" if cls == "cpu" else "gpu")]
    if vulkan_on_nvidia and backend == "llama.cpp":
        c = replace(c, bw_eff=c.bw_eff * VULKAN_NVIDIA_BW, prefill_eff=c.prefill_eff * VULKAN_NVIDIA_PREFILL)
    return c


# On a GPU the torch backend keeps quantized matrices in their GGUF blocks and multiplies them with its fused Triton
# kernels (backends/torch/kernels.py), which read each block once but gather it byte by byte, untuned. Not measured
# on a GPU yet: they are assumed to stream blocks at QUANT_KERNEL_EFF of the rate dense products reach (the rate
# bw_eff sets); benchmarks/torch_gpu_kernels.py measures it. Without triton (e.g. torch on Windows) the runtime
# expands each matrix with torch operations instead, about 50 bytes of traffic per weight (benchmarks/
# dequant_traffic.py), and says so when it starts.
QUANT_KERNEL_EFF = 0.6


def quant_kernel_bytes(n_bytes: float, device: Device, backend: str) -> float:
    """What streaming ``n_bytes`` of quantized blocks through the fused kernels costs beyond reading them at the
    dense rate, in bytes at that rate (torch on a GPU; CPU ranks hold float32 copies and pay nothing)."""
    return n_bytes * (1 / QUANT_KERNEL_EFF - 1) if backend == "torch" and device.backend != "cpu" else 0.0


def read_time_s(n_bytes: float, device: Device, backend: str) -> float:
    """Seconds to stream ``n_bytes`` of weights from a device's memory during decode."""
    return n_bytes / (device.mem_bandwidth_gbs * 1e9 * costs(backend, device).bw_eff)


def flop_time_s(flops: float, device: Device, backend: str, quant_factor: float = 1.0) -> float:
    """Seconds of prefill matmuls: ``flops`` at the device's rate times the backend's efficiency times the weights'
    quant-type factor (:data:`QUANT_PREFILL`)."""
    return flops / (device.fp16_tflops * 1e12 * costs(backend, device).prefill_eff * quant_factor)


def transfer_s(profile: RigProfile, a: str, b: str, n_bytes: float) -> float:
    link = profile.link(a, b)
    return (link.latency_us or 10.0) * 1e-6 + n_bytes / (link.bandwidth_gbs * 1e9)


def allreduce_s(profile: RigProfile, devices: tuple[str, ...], n_bytes: float, one_shot: bool = False) -> float:
    """One all-reduce of ``n_bytes`` over a group: a launch cost, the slowest link's latency per hop (2 for a
    one-shot all-reduce, 2 + (n-2)/2 for llama.cpp's), the backend's extra fixed cost (host-staged Vulkan), and
    2(n-1)/n of the bytes over the slowest link."""
    n = len(devices)
    if n < 2:
        return 0.0
    links = [profile.link(a, b) for i, a in enumerate(devices) for b in devices[i + 1:]]
    bw = min(lk.bandwidth_gbs for lk in links) * 1e9
    lat = max(lk.latency_us or 10.0 for lk in links) * 1e-6
    hops = 2 if one_shot else 2 + (n - 2) / 2
    extra = 0.0
    if not one_shot:
        pcie = any(lk.kind == "pcie" for lk in links)
        extra = max(c.allreduce_extra_s + (c.pcie_stall_s if pcie else 0.0)
                    for c in (costs("llama.cpp", profile.device(d)) for d in devices))
    return ALLREDUCE_BASE_S + extra + hops * lat + 2 * (n - 1) / n * n_bytes / bw


def layer_overhead_s(backend: str, device: Device, build: int | None = None) -> float:
    """A decode step's fixed cost per layer on ``device``: the class's, plus :data:`OLD_BUILD_LAYER_S` on a GPU
    under llama.cpp builds before :data:`GRAPHS_BUILD`."""
    c = costs(backend, device).layer_overhead_s
    if (backend == "llama.cpp" and build is not None and build < GRAPHS_BUILD and device.backend != "cpu"
            and device_class(device) != "pascal"):  # Pascal's 100 us came from 2023 builds already
        c += OLD_BUILD_LAYER_S
    return c


def stage_cost_s(profile: RigProfile, a: str, b: str, backend: str) -> float:
    """The fixed cost of a pipeline hand-off from device ``a`` to ``b`` beyond the bytes (scheduler copies and
    syncs; for ROCm without a GPU fabric, the PCIe copy's stall), by ``b``'s backend class."""
    c = costs(backend, profile.device(b))
    return c.stage_overhead_s + (c.pcie_stall_s if profile.link(a, b).kind == "pcie" else 0.0)


# ---- what a rig's recorded runs teach ------------------------------------------------------------------------------

CORRECTION_BOUNDS = (0.05, 20.0)  # a factor outside these says the fit is degenerate, not that the rig is


def fit_corrections(results: Iterable[Result], date: str | None = None) -> list[Correction]:
    """One :class:`Correction` per backend and set of devices the recorded ``results`` ran on (those that recorded
    their devices and what was predicted).

    Decode: the measured time per token is fitted as ``read_factor`` x the predicted weight-streaming time plus
    ``fixed_factor`` x the predicted fixed time (per-layer launches, collectives, hand-offs, per-token costs),
    least squares on relative error. Runs of models of different sizes tell the two apart; with one run, or runs
    that do not (the same model twice), both factors are the one ratio measured / predicted. Prefill: the geometric
    mean of measured / predicted prefill time."""
    groups: dict[tuple[str, tuple[str, ...]], list[Result]] = {}
    for r in results:
        if r.devices and r.backend is not None and r.predicted_decode_tok_s:
            groups.setdefault((r.backend.value, tuple(sorted(r.devices))), []).append(r)
    out = []
    for (backend, devices), rs in groups.items():
        read, fixed = _fit_decode(rs)
        pre = [r.predicted_prefill_tok_s / r.prefill_tok_s for r in rs
               if r.prefill_tok_s and r.predicted_prefill_tok_s]
        out.append(Correction(backend=backend, devices=devices, read_factor=round(read, 4),
                              fixed_factor=round(fixed, 4),
                              prefill_factor=round(math.exp(statistics.fmean(map(math.log, pre))), 4) if pre else None,
                              from_models=tuple(dict.fromkeys(r.model for r in rs)),
                              date=date or max((r.date for r in rs if r.date), default=None)))
    return out


def _fit_decode(rs: list[Result]) -> tuple[float, float]:
    """(read_factor, fixed_factor) for one device set's runs (see :func:`fit_corrections`)."""
    ratios = [r.predicted_decode_tok_s / r.decode_tok_s for r in rs if r.predicted_decode_tok_s]
    uniform = math.exp(statistics.fmean(map(math.log, ratios)))
    parts = [(r.predicted_read_s / (1 / r.decode_tok_s), r.predicted_fixed_s / (1 / r.decode_tok_s)) for r in rs
             if r.predicted_read_s is not None and r.predicted_fixed_s is not None]
    if len({round(x / (x + y), 2) for x, y in parts if x + y > 0}) < 2:
        return uniform, uniform
    sxx = sum(x * x for x, _ in parts)
    syy = sum(y * y for _, y in parts)
    sxy = sum(x * y for x, y in parts)
    sx, sy = sum(x for x, _ in parts), sum(y for _, y in parts)
    det = sxx * syy - sxy * sxy
    if det <= 1e-12 * sxx * syy:
        return uniform, uniform
    a, b = (sx * syy - sy * sxy) / det, (sy * sxx - sx * sxy) / det
    lo, hi = CORRECTION_BOUNDS
    if not (lo <= a <= hi and lo <= b <= hi):
        return uniform, uniform
    return a, b


def correction_for(corrections: Iterable[Correction], backend: str, devices: Iterable[str]) -> Correction | None:
    """The correction of ``backend`` on exactly this set of devices, if the rig has one."""
    key = tuple(sorted(set(devices)))
    return next((c for c in corrections if c.backend.value == backend and tuple(sorted(c.devices)) == key), None)


# Per MoE layer on a GPU, beyond a dense layer's launches: the router's softmax/top-k, the expert-id sort and the
# MUL_MAT_ID kernels (Qwen3-30B-A3B on one RTX 3090 Ti: 166.9 tok/s published, 274 predicted without this term;
# docs/cost-model-data.toml [[moe]], benchmarks/moe_cost_check.py).
MOE_LAYER_OVERHEAD_S = 40e-6
# Prefill of routed experts (MUL_MAT_ID): each expert multiplies only the tokens routed to it (ubatch x used /
# count: 16 to 64 for gpt-oss-20b at ubatch 128 to 512, below the 128-token tiles llama.cpp's MMQ kernels fill,
# ggml-cuda/mmq-config-*.cuh), gathered and scattered back. Share of the dense prefill rate they reach, fitted on the
# two all-GPU MoE prefill figures of docs/cost-model-data.toml [[moe]] (gpt-oss-20b: RTX 3090 pp512 4739 tok/s,
# RTX PRO 6000 pp128 5128), which the dense rate over-predicted 1.9x and 2.25x. No held-back MoE data checks it.
MOE_PREFILL_EFF = 0.45
