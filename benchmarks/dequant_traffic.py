"""Bytes the torch backend's GGUF-block expansion allocates per weight, by quant type.

GPU ranks keep quantized matrices in their GGUF blocks. Prompts, and decode steps on a rank without triton (no fused
kernels), expand each matrix with torch operations right before its product (``mixrun/backends/torch/quant.py``).
Every intermediate is written once and read back, so the traffic of an expansion is about twice what it allocates:
the cost the fused kernels (``kernels.py``) avoid. Measured with the torch profiler's memory accounting on a CPU, which allocates the
same intermediates a GPU would.

    python benchmarks/dequant_traffic.py [--rows 1024] [--cols 4096] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch.profiler import profile

from mixrun.backends.torch import quant

TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def allocated_per_weight(qtype: GGMLQuantizationType, rows: int, cols: int) -> tuple[float, float]:
    """(bytes of blocks, bytes allocated while expanding to bf16) per weight."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    raw = torch.randint(0, 256, (rows, cols // block * type_size), dtype=torch.uint8)
    with profile(profile_memory=True) as prof:
        quant.dequantize(raw, qtype, cols, torch.bfloat16)
    alloc = sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)
    n = rows * cols
    return raw.numel() / n, alloc / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = {}
    for name in TYPES:
        blocks, alloc = allocated_per_weight(GGMLQuantizationType[name], args.rows, args.cols)
        out[name] = {"block_bytes_per_weight": round(blocks, 3), "allocated_bytes_per_weight": round(alloc, 1),
                     "traffic_over_blocks": round((blocks + 2 * alloc) / blocks, 1)}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"expanding a {args.rows} x {args.cols} matrix to bf16 (traffic ~ blocks + 2 x allocated):")
    for name, r in out.items():
        print(f"  {name:5s} blocks {r['block_bytes_per_weight']:.3f} B/weight, allocated "
              f"{r['allocated_bytes_per_weight']:5.1f} B/weight, traffic x{r['traffic_over_blocks']:.0f} the blocks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
