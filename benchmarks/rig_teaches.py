"""A rig's runs teach the cost model (issue 17, item 7): bench two models on this machine with ``--record``, then
predict two models that were not benched, with the pristine profile and with the recorded one.

Per round: a fresh copy of the bundled ``cpu-only`` profile; ``mixrun bench --splits none --backend llama.cpp
--record`` of the bundled SmolLM2-135M Q4_1 and of a random llama in Q8_0 (16 layers, n_embd 1024, n_ff 4096),
which writes their results and a ``[[corrections]]`` entry into the copy; then, not recorded, benches of a third
model (random llama, F16, 12 layers, n_embd 1024, n_ff 2816) and a fourth (Q8_0, 20 layers, n_embd 1536, n_ff
4096), and ``mixrun plan`` of each with the pristine and the recorded profile. The random models carry SmolLM2's
tokenizer (tests/gguf_factory.py ``with_tokenizer``) so the bench's prompt tokenizes. The error is predicted /
measured - 1 of the llama.cpp candidate's decode (and prefill) rate. Benches share the machine with whatever else
runs: ``--nice`` lowers their niceness when allowed (root), which on a loaded VM shrinks the spread between runs.

Usage: python benchmarks/rig_teaches.py [--rounds N] [--repeats N] [--nice] [--json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import gguf  # noqa: E402

import gguf_factory  # noqa: E402
from mixrun.bundled import default_model  # noqa: E402
from mixrun.rig.profile import bundled_profiles  # noqa: E402

RECORDED = {"q8": dict(n_layers=16, n_embd=1024, n_head=16, n_head_kv=4, n_ff=4096, qtype="Q8_0")}
PREDICTED = {"f16": dict(n_layers=12, n_embd=1024, n_head=16, n_head_kv=4, n_ff=2816, qtype="F16"),
             "q8-big": dict(n_layers=20, n_embd=1536, n_head=16, n_head_kv=4, n_ff=4096, qtype="Q8_0")}


def make_models(folder: Path) -> dict[str, Path]:
    donor = default_model()
    n_vocab = len(gguf.GGUFReader(donor).fields["tokenizer.ggml.tokens"].data)
    out = {"smollm2": Path(donor)}
    for name, kw in {**RECORDED, **PREDICTED}.items():
        raw = gguf_factory.write_model(folder / f"{name}.raw.gguf", "llama", n_vocab=n_vocab, tied=False, **kw)
        out[name] = gguf_factory.with_tokenizer(raw, donor, folder / f"rand-{name}.gguf")
        raw.unlink()
    return out


def _mixrun(args: list[str], nice: bool) -> str:
    cmd = [sys.executable, "-m", "mixrun", *args]
    pre = (lambda: os.nice(-15)) if nice else None
    done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=pre, check=False)  # noqa: PLW1509
    if done.returncode:
        raise SystemExit(f"rig_teaches: {' '.join(args[:2])} failed: {done.stderr.strip()[-400:]}")
    return done.stdout


def _llama_candidate(plan_json: str) -> dict[str, Any]:
    return next(c for c in json.loads(plan_json)["candidates"] if c["backend"] == "llama.cpp")


def one_round(models: dict[str, Path], pristine: Path, folder: Path, n: int, repeats: int,
              nice: bool) -> dict[str, Any]:
    prof = folder / f"round{n}.toml"
    prof.write_text(pristine.read_text().replace('name = "cpu-only"', f'name = "cpu-only-round{n}"', 1))
    bench = ["--splits", "none", "--backend", "llama.cpp", "--repeats", str(repeats)]
    for name in ("smollm2", *RECORDED):
        _mixrun(["bench", str(models[name]), "-p", str(prof), *bench, "--record"], nice)
    out: dict[str, Any] = {"round": n, "corrections": _corrections(prof), "models": {}}
    for name in PREDICTED:
        meas = json.loads(_mixrun(["bench", str(models[name]), "-p", str(pristine), *bench, "--json"], nice))
        cand = meas["candidates"][0]
        before = _llama_candidate(_mixrun(["plan", str(models[name]), "-p", str(pristine), "--json"], nice))
        after = _llama_candidate(_mixrun(["plan", str(models[name]), "-p", str(prof), "--json"], nice))
        row = {}
        for metric in ("decode_tok_s", "prefill_tok_s"):
            m = cand[metric]
            row[metric] = {"measured": m["median"], "min": m["min"], "max": m["max"],
                           "before": before[metric], "after": after[metric],
                           "error_before": before[metric] / m["median"] - 1,
                           "error_after": after[metric] / m["median"] - 1}
        out["models"][name] = row
    return out


def _corrections(profile: Path) -> list[dict[str, Any]]:
    import tomllib

    return tomllib.loads(profile.read_text()).get("corrections", [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--nice", action="store_true", help="run the benches at niceness -15 (needs root)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", type=Path, help="keep the models and profiles in this folder")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="rig-teaches-")) if args.keep is None else args.keep
    folder.mkdir(parents=True, exist_ok=True)
    try:
        models = make_models(folder)
        pristine = folder / "cpu-only.toml"
        pristine.write_text(dict(bundled_profiles())["cpu-only"].read_text())
        rounds = [one_round(models, pristine, folder, n, args.repeats, args.nice) for n in range(1, args.rounds + 1)]
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    summary = {name: {k: statistics.median(r["models"][name]["decode_tok_s"][k] for r in rounds)
                      for k in ("error_before", "error_after")} for name in PREDICTED}
    if args.json:
        json.dump({"rounds": rounds, "median_decode_error": summary, "load": os.getloadavg()}, sys.stdout, indent=1)
        return
    for r in rounds:
        for c in r["corrections"]:
            print(f"round {r['round']}: correction weights x{c['read_factor']}, fixed x{c['fixed_factor']}, "
                  f"prefill x{c.get('prefill_factor')} from {', '.join(c['from_models'])}")
        for name, row in r["models"].items():
            for metric, m in row.items():
                print(f"  {name:7} {metric:14} measured {m['measured']:8.1f} ({m['min']:.1f}-{m['max']:.1f})"
                      f"  before {m['before']:8.1f} ({m['error_before']:+.0%})"
                      f"  after {m['after']:8.1f} ({m['error_after']:+.0%})")
    for name, s in summary.items():
        print(f"median decode error, {name}: before {s['error_before']:+.1%}, after {s['error_after']:+.1%}")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
