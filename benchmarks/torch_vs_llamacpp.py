"""mixrun's torch backend against llama.cpp on the CPU, in one run.

1. Decode speed at TP=1 on the same F32 GGUF (SmolLM2-135M dequantized, so both run identical weights): the
   torch engine's decode tok/s over llama-cpp-python's, same threads, same prompt, greedy, alternating A/B runs;
   medians and their ratio (issue 5 aims at >= 0.8x). The torch rank picks its one-row product kernel as it
   loads (``mixrun/backends/torch/cpu_matvec.py``: measured, cached, or forced with ``--matvec``); the line
   says which and how.
2. Communication accounting: bytes all-reduced per token and TP member against 2 x layers x hidden x 4 bytes.
3. Greedy agreement on the bundled Q4_1 SmolLM2 over five prompts: the first token where the torch backend
   (weights dequantized to float32) and llama.cpp (quantized matmuls with Q8_0-quantized activations) part.
4. Decode speed of a random F32 qwen3moe (8 layers, 32 experts of 384, 4 used), the same A/B as 1.
5. The decode kernels behind 1: weight bandwidth of one-row products over SmolLM2-shaped float32 matrices with
   ``F.linear`` (MKL's product: one thread on the AMD EPYC, all of them on an Intel Xeon), with the torch
   backend's row blocks (one batched product, all threads), and with row blocks in a huge-page-advised arena (as
   the loader allocates them); ratios to ``F.linear``.

    python benchmarks/torch_vs_llamacpp.py [--repeats 5] [--tokens 64] [--threads 2] [--matvec linear|rowblock]
                                           [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain photosynthesis in two sentences.",
    "List three uses of a paperclip.",
    "Why is the sky blue?",
]


def llama_decode(llm, toks: list[int], n: int) -> float:
    llm.reset()
    t_first = t_last = None
    got = 0
    for _tok in llm.generate(toks, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        now = time.perf_counter()
        if t_first is None:
            t_first = now
        t_last = now
        got += 1
        if got == n:
            break
    return (got - 1) / (t_last - t_first)


def torch_decode(eng, toks: list[int], n: int, nonce: int) -> float:
    from mixrun.backends.base import Sampling

    eng._fed = []  # no prefix reuse: the same work as llama.cpp's reset
    t_first = t_last = None
    got = 0
    for _tok in eng.generate_ids(toks, Sampling(temperature=0.0, repeat_penalty=1.0, max_tokens=n), max_new=n):
        now = time.perf_counter()
        if t_first is None:
            t_first = now
        t_last = now
        got += 1
    return (got - 1) / (t_last - t_first)


def ab_decode(eng, llm, toks: list[int], repeats: int, tokens: int) -> dict:
    """Decode tok/s of the torch engine and llama.cpp on the same prompt, alternating runs after a warm-up of
    each; medians, their ratio and every run. Closes both."""
    try:
        llama_decode(llm, toks, 8)
        torch_decode(eng, toks, 8, 0)
        a, b = [], []
        for i in range(repeats):
            a.append(torch_decode(eng, toks, tokens, i))
            b.append(llama_decode(llm, toks, tokens))
    finally:
        eng.close()
        llm.close()
    ta, tb = statistics.median(a), statistics.median(b)
    return {"torch_tok_s": round(ta, 2), "llamacpp_tok_s": round(tb, 2), "ratio": round(ta / tb, 3),
            "torch_runs": [round(x, 2) for x in a], "llamacpp_runs": [round(x, 2) for x in b]}


def kernel_bandwidth(threads: int, rounds: int = 5) -> dict[str, float]:
    """GB/s of one decode step's products (30 layers of SmolLM2's fused matrices and the output head), best of
    ``rounds``, for three ways of computing them."""
    import torch
    import torch.nn.functional as F

    from mixrun.backends.torch.cpu_matvec import cpu_chunks
    from mixrun.backends.torch.linear import Weight
    from mixrun.backends.torch.weights import materialize

    torch.set_num_threads(threads)
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]
    with torch.device("meta"):
        net = torch.nn.ModuleList(torch.nn.Linear(k, n, bias=False) for n, k in shapes)
    arena = materialize(net, torch.device("cpu"))
    plain = [torch.randn(n, k) for n, k in shapes]
    with torch.no_grad():
        for lin, w in zip(net, plain, strict=True):
            lin.weight.copy_(w)
    xs = {k: torch.randn(1, k) for _n, k in shapes}
    ways = {"F.linear": [lambda x, w=w: F.linear(x, w) for w in plain],
            "row blocks": [Weight(w, None, cpu_chunks(w.shape[0], threads)) for w in plain],
            "row blocks, huge pages": [Weight(lin.weight, None, cpu_chunks(lin.out_features, threads))
                                       for lin in net]}
    total = sum(n * k * 4 for n, k in shapes)
    out = {}
    with torch.inference_mode():
        for name, fns in ways.items():
            best = float("inf")
            for _ in range(rounds):
                t0 = time.perf_counter()
                for (_n, k), fn in zip(shapes, fns, strict=True):
                    fn(xs[k])
                best = min(best, time.perf_counter() - t0)
            out[name] = round(total / best / 1e9, 1)
    del arena
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--matvec", choices=["linear", "rowblock"], default=None,
                    help="force the torch rank's one-row product kernel (default: it measures, or uses its cache)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.matvec:
        os.environ["MIXRUN_TORCH_CPU_MATVEC"] = args.matvec  # the ranks inherit it

    import llama_cpp

    import gguf_factory
    from mixrun.backends.base import Sampling
    from mixrun.backends.torch.engine import TorchEngine
    from mixrun.backends.torch.parallel import Layout, Stage
    from mixrun.bundled import default_model

    q41 = default_model()
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        f32 = str(gguf_factory.dequantized_copy(q41, Path(tmp) / "SmolLM2-F32.gguf"))
        llm = llama_cpp.Llama(model_path=f32, n_ctx=512, n_threads=args.threads, verbose=False)
        toks = llm.tokenize(b"<|im_start|>user\nWrite a long story about a lighthouse keeper.<|im_end|>\n"
                            b"<|im_start|>assistant\n", add_bos=False, special=True)
        eng = TorchEngine(f32, n_ctx=512, n_threads=args.threads)
        matvec = eng.ready[0].get("cpu_matvec") or {}
        out["decode"] = {**ab_decode(eng, llm, toks, args.repeats, args.tokens), "torch_matvec": matvec}

        # the same A/B on a random qwen3moe (8 layers, 32 experts of 384, 4 used; F32 everywhere): a decode step
        # reads only its chosen experts, one small product each (the eager FoldedStep, not the buffered DecodeStep)
        moe = gguf_factory.MoEShape(n_expert=32, n_expert_used=4, n_ff_exp=384)
        mpath = str(gguf_factory.write_moe_model(Path(tmp) / "moe.gguf", "qwen3moe", n_layers=8, n_embd=768, n_head=12,
                                                 n_head_kv=4, head_dim=64, n_ff=2048, n_vocab=2048, moe=moe, seed=3))
        mtoks = [1, 5, 9, 3, 7, 2, 11, 4]
        llm = llama_cpp.Llama(model_path=mpath, n_ctx=512, n_threads=args.threads, verbose=False)
        eng = TorchEngine(mpath, n_ctx=512, n_threads=args.threads)
        out["moe_decode"] = ab_decode(eng, llm, mtoks, args.repeats, args.tokens)

    # communication: TP=3 over SmolLM2's three KV heads, one prompt of n tokens
    toks5 = [504, 3575, 282, 4649, 314]
    eng = TorchEngine(q41, n_ctx=128, layout=Layout((Stage(("a", "b", "c"), (0, 30), (1, 1, 1)),)), simulate=True)
    try:
        eng.logits(toks5)
        tele = eng.sync_telemetry()
    finally:
        eng.close()
    theory = 2 * 30 * 576 * 4 * len(toks5)
    out["comm"] = {"per_rank_bytes": [tele[r]["layer_allreduce_bytes"] for r in sorted(tele)], "theory": theory}

    # greedy agreement on the quantized file
    llm = llama_cpp.Llama(model_path=q41, n_ctx=512, n_threads=args.threads, verbose=False)
    eng = TorchEngine(q41, n_ctx=512, n_threads=args.threads)
    rows = []
    try:
        for p in PROMPTS:
            text = f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n".encode()
            toks = llm.tokenize(text, add_bos=False, special=True)
            llm.reset()
            ref = []
            for t in llm.generate(toks, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
                ref.append(t)
                if len(ref) == 48 or llm.token_eos() == t:
                    break
            ours = list(eng.generate_ids(toks, Sampling(temperature=0.0, repeat_penalty=1.0, max_tokens=48)))
            same = next((i for i, (x, y) in enumerate(zip(ours, ref, strict=False)) if x != y),
                        min(len(ours), len(ref)))
            rows.append({"prompt": p, "agree_tokens": same, "of": min(len(ours), len(ref))})
    finally:
        eng.close()
        llm.close()
    out["q4_1_greedy"] = rows

    out["kernels_gbs"] = kernel_bandwidth(args.threads)

    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    d = out["decode"]
    print(f"decode, F32 SmolLM2, {args.threads} threads, {args.tokens} tokens x {args.repeats}: torch {d['torch_tok_s']}"
          f" tok/s, llama.cpp {d['llamacpp_tok_s']} tok/s, ratio {d['ratio']} (aim >= 0.8)")
    m = out["moe_decode"]
    print(f"decode, F32 random qwen3moe (8 layers, 4 of 32 experts): torch {m['torch_tok_s']} tok/s, llama.cpp "
          f"{m['llamacpp_tok_s']} tok/s, ratio {m['ratio']}")
    mv = d["torch_matvec"]
    gbs = (f": linear {mv['linear_gbs']}, rowblock {mv['rowblock_gbs']} GB/s" if mv.get("linear_gbs") else "")
    print(f"torch one-row product kernel: {mv.get('kernel')} ({mv.get('how')}{gbs}); "
          f"runs torch {d['torch_runs']}, llama.cpp {d['llamacpp_runs']}; load average {os.getloadavg()[0]:.2f}")
    c = out["comm"]
    ok = all(b == c["theory"] for b in c["per_rank_bytes"])
    print(f"all-reduce bytes per TP=3 rank for 5 tokens: {c['per_rank_bytes']} vs theory {c['theory']}: "
          f"{'equal' if ok else 'DIFFERENT'}")
    for r in rows:
        print(f"Q4_1 greedy, {r['prompt']!r}: first {r['agree_tokens']} of {r['of']} tokens agree")
    k = out["kernels_gbs"]
    ref = k["F.linear"]
    print("one-row products, GB/s of weights: " + ", ".join(f"{n} {v} (x{v / ref:.2f})" for n, v in k.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
