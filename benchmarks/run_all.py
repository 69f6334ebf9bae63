"""Every benchmark in benchmarks/ in one run, each with a fast setting: one summary line each, one table.

Usage: python benchmarks/run_all.py [--update-docs] [--json] [--only NAME,...] [--budget-s S]

Each script runs as a subprocess (its own `--json` output is parsed where it has one), with fewer repeats than its
own default, so the figures are noisier than the entries of docs/benchmarks.md that each script produced alone;
the ratios are still against a reference measured in the same run. A script that is absent from the checkout,
fails or runs out of time gets a row saying so, and the others still run. The whole run stops starting new
scripts when `--budget-s` (default 570 s, under the 10-minute bar) is spent. `--update-docs` rewrites the section
of docs/benchmarks.md between `<!-- run_all:begin -->` and `<!-- run_all:end -->` (appended when absent),
atomically.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- run_all:begin -->", "<!-- run_all:end -->"


@dataclass(frozen=True)
class Bench:
    name: str
    argv: list[str]  # after the interpreter: a script in benchmarks/, or `-m mixrun.cli ...`
    setting: str  # what the fast setting is, for the table
    summarize: Callable[[str], str]  # stdout -> one line
    timeout_s: int
    script: str | None = None  # the file that must exist in benchmarks/
    skip_when: str | None = None  # a failure whose stderr says this is a skip (e.g. no CUDA device here)


# ---- one-line summaries -----------------------------------------------------------------------------------------


def _rows(text: str) -> list[tuple[str, float, float]]:
    """``name  number  number`` lines of the plain-text tables (startup, planner speed)."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^(.*?)\s+(-?[\d.]+)\s+(-?[\d.]+)\s*$", line)
        if m:
            out.append((m[1].strip(), float(m[2]), float(m[3])))
    return out


def sum_startup(text: str) -> str:
    rows = _rows(text)
    ref = rows[0]
    rest = ", ".join(f"{n.replace(' (bundled SmolLM2)', '')} x{r:.2f}" for n, _s, r in rows[1:])
    return f"`python -c pass` {ref[1]:.3f} s; {rest}"


def sum_planner(text: str) -> str:
    rows = _rows(text)
    short = {"dual-3090": "4 devices (ref)", "8x-h100": "9 devices", "64 H100": "72 devices over 8 hosts",
             "cpu-only": "cpu-only, nothing fits (~40 re-plans)"}
    bars = {"9 devices": " (bar 50)", "72 devices over 8 hosts": " (bar 1000)"}
    parts = []
    for name, ms, _x in rows:
        label = next((v for k, v in short.items() if name.startswith(k)), name)
        parts.append(f"{label} {ms:.1f} ms{bars.get(label, '')}")
    return "; ".join(parts)


def sum_cost(text: str) -> str:
    s = json.loads(text)["summary"]

    def one(name: str, st: dict[str, Any]) -> str:
        return (f"{name} n={st['n']}: median |ln ratio| {st['median_abs_log_ratio']:.3f}, "
                f"{st['within_30pct']:.0%} within 30%, median ratio {st['median_ratio']:.2f}")

    rk = s["ranking_decode"]
    return (f"{one('decode', s['decode'])}; {one('prefill', s['prefill'])}; split ranking (decode) "
            f"{rk['correct']}/{rk['pairs']} pairs as measured")


def sum_memory(text: str) -> str:
    sys.path.insert(0, str(HERE))
    from memory_vs_llamacpp import summary_groups, worst

    return "worst |error| vs llama.cpp's buffer report: " + "; ".join(
        f"{label} ({len(rows)} cases): {worst(rows)}" for label, rows in summary_groups(json.loads(text)))


def sum_chat(text: str) -> str:
    s = json.loads(text)["summary"]
    r = s["ratios_median_of_rounds"]
    pr = s.get("probe")
    probe = (f"; in-process probe: mixrun adds {pr['per_token_us']:.1f} us per token "
             f"({pr['pct_of_raw_decode_step']:.2g}% of a decode step)") if pr else ""
    return (f"decode mixrun/raw {r['decode_ratio']:.3f} (bar >= 0.97: {'pass' if s['decode_pass'] else 'FAIL'}), "
            f"TTFT {r['ttft_ratio']:.3f} (bar <= 1.2: {'pass' if s['ttft_pass'] else 'FAIL'}), "
            f"same answers: {'yes' if s['same_answer_all_rounds'] else 'NO'}{probe}")


def sum_torch(text: str) -> str:
    d = json.loads(text)
    dec, comm = d["decode"], d["comm"]
    same = all(b == comm["theory"] for b in comm["per_rank_bytes"])
    agree = d.get("q4_1_greedy") or []
    ag = (f"; Q4_1 greedy agreement: {sum(a['agree_tokens'] for a in agree)}/{sum(a['of'] for a in agree)} tokens "
          f"before the first difference over {len(agree)} prompts") if agree else ""
    k = d.get("kernels_gbs") or {}
    kern = (f"; one-row products {k['row blocks, huge pages']} GB/s vs F.linear {k['F.linear']}"
            if "F.linear" in k else "")
    return (f"decode torch/llama.cpp {dec['ratio']:.2f} ({dec['torch_tok_s']:.1f} vs {dec['llamacpp_tok_s']:.1f} "
            f"tok/s, F32 SmolLM2); TP=3 all-reduce bytes {'= theory' if same else '!= theory'}{ag}{kern}")


def sum_dequant(text: str) -> str:
    d = json.loads(text)
    return "allocated B/weight expanding GGUF blocks to bf16: " + ", ".join(
        f"{k} {v['allocated_bytes_per_weight']:g}" for k, v in d.items())


def sum_prefill(text: str) -> str:
    d = json.loads(text)
    s = d["seconds"]
    return (f"{d['tokens']}-token prompt, 2 stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in s.items())
            + f": pipelined x{d['speedup']:.2f}")


def sum_roofline(text: str) -> str:
    lines = text.strip().splitlines()
    start = next((i for i, line in enumerate(lines) if "copy bandwidth" in line), 0)
    return " ".join(line.strip() for line in lines[start:])


def sum_last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def sum_bench(text: str) -> str:
    d = json.loads(text)
    by = {c["backend"]: c for c in d["candidates"] if c["decode_tok_s"]}
    parts = [f"{c['label']}: decode {c['decode_tok_s']['median']:.1f} tok/s "
             f"(x{c['measured_over_predicted']:.2f} predicted), prefill {c['prefill_tok_s']['median']:.0f} tok/s"
             for c in d["candidates"] if c["decode_tok_s"]]
    if {"torch", "llama.cpp"} <= set(by):
        ratio = by["torch"]["decode_tok_s"]["median"] / by["llama.cpp"]["decode_tok_s"]["median"]
        parts.append(f"torch/llama.cpp decode {ratio:.2f}")
    return "; ".join(parts) or "nothing measured"


PY = sys.executable
BENCHES = [
    Bench("CLI start-up", [str(HERE / "startup.py"), "--runs", "3"], "3 runs", sum_startup, 120, "startup.py"),
    Bench("planner speed", [str(HERE / "planner_speed.py"), "--repeats", "3"], "median of 3", sum_planner, 120,
          "planner_speed.py"),
    Bench("cost model vs published", [str(HERE / "cost_model_check.py"), "--json"], "all rows", sum_cost, 180,
          "cost_model_check.py"),
    Bench("memory model vs llama.cpp", [str(HERE / "memory_vs_llamacpp.py"), "--json"], "saved + live MoE",
          sum_memory, 120, "memory_vs_llamacpp.py"),
    Bench("mixrun bench, cpu-only", ["-m", "mixrun.cli", "bench", "--profile", "cpu-only", "--tokens", "32",
                                     "--prompt-tokens", "128", "--repeats", "2", "--json"],
          "128-token prompt, 32 tokens, 2 runs", sum_bench, 240),
    Bench("torch backend vs llama.cpp", [str(HERE / "torch_vs_llamacpp.py"), "--repeats", "2", "--tokens", "24",
                                         "--json"], "24 tokens, 2 runs", sum_torch, 300, "torch_vs_llamacpp.py"),
    Bench("chat overhead vs raw llama-cpp-python", [str(HERE / "chat_overhead.py"), "--max-tokens", "32",
                                                    "--repeats", "2", "--warmup", "0", "--no-raw-defaults",
                                                    "--json"],
          "32 tokens, 2 rounds", sum_chat, 300, "chat_overhead.py"),
    Bench("torch pipelined prefill", [str(HERE / "torch_pipelined_prefill.py"), "--repeats", "2", "--json"],
          "480 tokens, 2 rounds", sum_prefill, 180, "torch_pipelined_prefill.py"),
    Bench("torch GGUF-block expansion traffic", [str(HERE / "dequant_traffic.py"), "--rows", "256", "--json"],
          "256 x 4096", sum_dequant, 120, "dequant_traffic.py"),
    Bench("torch backend vs GPU roofline", [str(HERE / "torch_gpu_roofline.py"), "--tokens", "64", "--repeats", "2"],
          "64 tokens, 2 runs", sum_roofline, 300, "torch_gpu_roofline.py", skip_when="no CUDA device here"),
    Bench("torch fused GGUF kernels vs copy bandwidth", [str(HERE / "torch_gpu_kernels.py"), "--iters", "20"],
          "20 calls each", sum_last_line, 300, "torch_gpu_kernels.py", skip_when="no CUDA device here"),
]


# ---- running ----------------------------------------------------------------------------------------------------


def run_one(b: Bench, timeout_s: float, env: dict[str, str]) -> dict[str, Any]:
    row: dict[str, Any] = {"name": b.name, "setting": b.setting, "seconds": 0.0}
    if b.script and not (HERE / b.script).is_file():
        return {**row, "status": "absent", "result": f"absent: benchmarks/{b.script} is not in this checkout"}
    if timeout_s < 5:
        return {**row, "status": "not run", "result": "not run: the time budget was spent"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([PY, *b.argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {**row, "seconds": time.perf_counter() - t0, "status": "timeout",
                "result": f"timed out after {timeout_s:.0f} s"}
    row["seconds"] = time.perf_counter() - t0
    if proc.returncode != 0 and b.skip_when and b.skip_when in proc.stderr:
        return {**row, "status": "skipped", "result": f"skipped: {b.skip_when}"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {**row, "status": "failed", "result": f"failed (exit {proc.returncode}): {last[:200]}"}
    try:
        return {**row, "status": "ok", "result": b.summarize(proc.stdout)}
    except (ValueError, KeyError, IndexError, TypeError, ZeroDivisionError) as e:
        return {**row, "status": "failed", "result": f"output not understood ({type(e).__name__}: {e})"}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def ver(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "absent"

    mem = ""
    try:
        import psutil

        mem = f", {psutil.virtual_memory().total / 2**30:.0f} GiB"
    except ImportError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "python": platform.python_version(),
            "llama_cpp_python": ver("llama_cpp_python"), "torch": ver("torch"), "mixrun": ver("mixrun")}


def markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    m = info["machine"]
    lines = [
        BEGIN,
        "## All benchmarks in one run (`benchmarks/run_all.py`)",
        "",
        f"{info['date']}, {m['cpu']} ({m['cores']} cores{m['memory']}), Python {m['python']}, llama-cpp-python "
        f"{m['llama_cpp_python']}, torch {m['torch']}; load average {info['load_before']:.2f} before, "
        f"{info['load_after']:.2f} after; {info['total_s']:.0f} s in all. Each script ran with the fast setting "
        "shown, so its figures are noisier than the sections above, which each script produced alone with its "
        "default setting; other processes may share the cores: read the ratios, not the absolute speeds. A row "
        "says `absent` for a script not in the checkout.",
        "",
        "| benchmark | setting | result | s |",
        "|---|---|---|---:|",
    ]
    for r in rows:
        cell = r["result"].replace("|", "\\|")
        lines.append(f"| {r['name']} | {r['setting']} | {cell} | {r['seconds']:.0f} |")
    lines += ["", "Run it again with `python benchmarks/run_all.py --update-docs`.", END]
    return "\n".join(lines) + "\n"


def update_docs(section: str, path: Path = DOCS) -> None:
    """Replace the marked section of ``path`` (or append it), atomically."""
    sys.path.insert(0, str(ROOT))
    from mixrun.fsutil import atomic_write_text

    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    i, j = text.find(BEGIN), text.find(END)
    if i >= 0 and j > i:
        new = text[:i] + section.rstrip("\n") + text[j + len(END):]
    else:
        new = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, new)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--update-docs", action="store_true", help="rewrite the run_all section of docs/benchmarks.md")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--only", help="comma-separated benchmark names (or parts of them) to run")
    ap.add_argument("--budget-s", type=float, default=570.0, help="stop starting scripts after this many seconds")
    args = ap.parse_args()
    chosen = BENCHES
    if args.only:
        keys = [k.strip().lower() for k in args.only.split(",") if k.strip()]
        chosen = [b for b in BENCHES if any(k in b.name.lower() for k in keys)]
        if not chosen:
            print(f"run_all: --only {args.only}: no such benchmark (known: {', '.join(b.name for b in BENCHES)})",
                  file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as cfg:
        # an empty config dir: `mixrun bench` compares with the bundled profile's predictions, not a recorded copy
        env = {**os.environ, "MIXRUN_CONFIG_DIR": cfg}
        for b in chosen:
            left = args.budget_s - (time.perf_counter() - t0)
            print(f"[{time.perf_counter() - t0:5.0f}s] {b.name} ...", file=sys.stderr, flush=True)
            rows.append(run_one(b, min(b.timeout_s, left), env))
            print(f"        {rows[-1]['result']}", file=sys.stderr, flush=True)
    info = {"date": dt.date.today().isoformat(), "machine": machine(), "load_before": load_before,
            "load_after": os.getloadavg()[0], "total_s": time.perf_counter() - t0}
    if args.json:
        print(json.dumps({"info": info, "rows": rows}, indent=2))
    else:
        w = max(len(r["name"]) for r in rows)
        for r in rows:
            print(f"{r['name']:<{w}}  {r['seconds']:5.0f} s  {r['result']}")
        print(f"total {info['total_s']:.0f} s")
    if args.update_docs:
        update_docs(markdown(rows, info))
        print(f"updated {DOCS.relative_to(ROOT)}", file=sys.stderr)
    return 0 if all(r["status"] in ("ok", "absent", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
