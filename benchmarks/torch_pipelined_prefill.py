"""Pipelined prefill in the torch backend: a long prompt through a 2-stage pipeline in one pass against in chunks.

With several stages the ranks take a prompt in chunks (``prefill_chunk`` tokens), so stage 2 works on chunk i
while stage 1 works on chunk i+1. The script runs the bundled SmolLM2 split into two stages of 15 layers (two CPU
processes, one thread each: ``--simulate``), feeds the same prompt to an engine whose chunk covers the whole prompt
and to one with small chunks, alternating, and reports the median time to the first token of each and their ratio.
On two cores the ceiling is 2x (two stages busy at once) less the pipeline's fill and drain.

    python benchmarks/torch_pipelined_prefill.py [--tokens 480] [--chunk 64] [--repeats 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=480)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from mixrun.backends.base import Sampling
    from mixrun.backends.torch.engine import TorchEngine
    from mixrun.backends.torch.parallel import Layout, Stage
    from mixrun.bundled import default_model

    model = default_model()
    layout = Layout((Stage(("a",), (0, 15), (3,)), Stage(("b",), (15, 30), (3,))))
    sizes = {"one pass": args.tokens, f"chunks of {args.chunk}": args.chunk}
    engines = {name: TorchEngine(model, n_ctx=args.tokens + 64, layout=layout, simulate=True, n_threads=1,
                                 prefill_chunk=size) for name, size in sizes.items()}
    times: dict[str, list[float]] = {name: [] for name in sizes}
    try:
        for r in range(args.repeats + 1):
            prompt = [(i * 7919 + r) % 40000 + 100 for i in range(args.tokens)]  # a new prompt each round
            for name, eng in engines.items():
                eng._fed = []
                t0 = time.perf_counter()
                next(iter(eng.generate_ids(prompt, Sampling(temperature=0.0, max_tokens=1), max_new=1)))
                if r:  # the first round warms up
                    times[name].append(time.perf_counter() - t0)
    finally:
        for eng in engines.values():
            eng.close()
    med = {name: statistics.median(v) for name, v in times.items()}
    one, chunked = med["one pass"], med[f"chunks of {args.chunk}"]
    out = {"tokens": args.tokens, "chunk": args.chunk, "seconds": {k: round(v, 3) for k, v in med.items()},
           "speedup": round(one / chunked, 2)}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{args.tokens}-token prompt through 2 stages (SmolLM2, CPU processes, 1 thread each), median of "
          f"{args.repeats}: one pass {one:.2f} s, chunks of {args.chunk} {chunked:.2f} s: x{one / chunked:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
