"""The fused Triton GGUF-block products (``mixrun/backends/torch/kernels.py``) against expanding then multiplying.

Decode multiplies each weight matrix by one activation row, so its time is the time to read the matrix. For each
quant type and a 4096 x 4096 and a 14336 x 4096 matrix (random blocks with sane fp16 scales, bf16 activations,
M = 1) this times, with CUDA events after a warm-up: (a) ``kernels.matvec``, (b) ``quant.dequantize`` + ``F.linear``
(what GPU ranks do without the kernels) and (c) a plain copy of the same bytes, the device's bandwidth reference
(read + write). Each call uses the next of several copies of the matrix, together well over the L2 cache, so reads
come from device memory. It first checks (a) and (b) against a float32 product (a mismatch exits 1), then prints
the raw block bytes read per second and that as a share of the copy bandwidth. Needs a CUDA GPU and triton;
without them it says so and exits 2.

    python benchmarks/torch_gpu_kernels.py [--iters 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SHAPES = ((4096, 4096), (14336, 4096))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def random_blocks(torch, qtype, rows: int, cols: int):
    """uint8 (rows, row bytes) of random blocks on the GPU with fp16 scales in [-0.05, 0.05]."""
    import numpy as np

    from gguf_factory import random_blocks as blocks

    return torch.from_numpy(blocks(qtype, rows, cols, np.random.default_rng(0))).cuda()


def time_us(torch, fn, n_copies: int, iters: int) -> float:
    """Mean microseconds of ``fn(i)`` over ``iters`` calls cycling through ``n_copies`` inputs, after a warm-up."""
    for i in range(n_copies):
        fn(i)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(iters):
        fn(i % n_copies)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def check(torch, F, kernels, quant, x, raw, qtype, name: str) -> list[str]:  # noqa: N803
    """Both paths against a float32 product; a line per one off by more than bf16 rounding allows."""
    n, k = raw.shape[0], x.shape[1]
    want = x.float() @ quant.dequantize(raw, qtype, k, torch.float32).T
    scale = want.abs().max().item()
    bad = []
    for label, got in (("matvec", kernels.matvec(x, raw, qtype, k)),
                       ("dequantize + linear", F.linear(x, quant.dequantize(raw, qtype, k, torch.bfloat16)))):
        rel = (got.float() - want).abs().max().item() / scale
        if not rel < 2e-2:  # bf16 output (and bf16 weights for the second): about 2**-8 relative
            bad.append(f"{name} {n}x{k} {label}: max error {rel:.1e} of the largest output")
    return bad


def measure(torch, F, kernels, quant, x, raw, qtype, iters: int, l2_bytes: int) -> tuple[float, float, float]:  # noqa: N803
    """Microseconds of (matvec, dequantize + linear, copy of the blocks), each input in several copies."""
    k = x.shape[1]
    n_copies = max(2, -(-4 * l2_bytes // raw.numel()))
    raws = [raw.clone() for _ in range(n_copies)]
    dst = torch.empty_like(raw)
    return (time_us(torch, lambda i: kernels.matvec(x, raws[i], qtype, k), n_copies, iters),
            time_us(torch, lambda i: F.linear(x, quant.dequantize(raws[i], qtype, k, torch.bfloat16)), n_copies,
                    max(5, iters // 5)),
            time_us(torch, lambda i: dst.copy_(raws[i]), n_copies, iters))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("torch_gpu_kernels: no CUDA device here", file=sys.stderr)
        return 2
    try:
        from mixrun.backends.torch import kernels
    except ImportError as e:
        print(f"torch_gpu_kernels: no triton here ({e})", file=sys.stderr)
        return 2
    import torch.nn.functional as F  # noqa: N812
    from gguf import GGMLQuantizationType

    from mixrun.backends.torch import quant

    l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    cases = []
    for name in TYPES:
        qtype = GGMLQuantizationType[name]
        for n, k in SHAPES:
            raw = random_blocks(torch, qtype, n, k)
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            cases.append((name, qtype, raw, x))
    failed = [line for name, qtype, raw, x in cases for line in check(torch, F, kernels, quant, x, raw, qtype, name)]
    if failed:
        print("matvec check FAILED:\n  " + "\n  ".join(failed))
        return 1
    print(f"{torch.cuda.get_device_name(0)}: bf16 x, M = 1; GB/s of GGUF block bytes read, % of copy bandwidth")
    print(f"{'type':5s} {'shape':11s} {'MB':>7s} {'fused us':>8s} {'GB/s':>7s} {'%copy':>6s} {'deq+mm us':>9s} "
          f"{'GB/s':>7s} {'%copy':>6s} {'copy':>7s} {'speedup':>7s}")
    shares, speedups = [], []
    for name, qtype, raw, x in cases:
        t_fused, t_dequant, t_copy = measure(torch, F, kernels, quant, x, raw, qtype, args.iters, l2_bytes)
        n_bytes = raw.numel()
        copy_gbs = 2 * n_bytes / t_copy / 1e3  # read + write
        fused_gbs, dequant_gbs = n_bytes / t_fused / 1e3, n_bytes / t_dequant / 1e3
        shares.append(fused_gbs / copy_gbs)
        speedups.append(t_dequant / t_fused)
        print(f"{name:5s} {raw.shape[0]:>5d}x{x.shape[1]:<5d} {n_bytes / 1e6:7.1f} {t_fused:8.1f} {fused_gbs:7.0f} "
              f"{100 * fused_gbs / copy_gbs:5.0f}% {t_dequant:9.1f} {dequant_gbs:7.0f} "
              f"{100 * dequant_gbs / copy_gbs:5.0f}% {copy_gbs:7.0f} {t_dequant / t_fused:6.1f}x", flush=True)
    print(f"verdict: matvec reads the blocks at a median {100 * statistics.median(shares):.0f}% of copy bandwidth "
          f"(worst {100 * min(shares):.0f}%); dequantize + linear takes a median {statistics.median(speedups):.1f}x "
          f"its time (least {min(speedups):.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
