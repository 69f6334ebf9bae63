"""Chat overhead: ``mixrun chat --prompt`` decode tok/s and time to first token against raw llama-cpp-python on the
same model, threads, prompt and sampling, measured in the same run.

Usage: python benchmarks/chat_overhead.py [MODEL] [--threads T] [--max-tokens N] [--repeats R] [--warmup W]
           [--prompt TEXT] [--within F] [--no-raw-defaults] [--no-probe] [--json]
Bars (issue 4, section 3): mixrun's decode overhead under 3% (decode tok/s ratio mixrun/raw >= 0.97) and time to
first token within 1.2x (TTFT ratio mixrun/raw <= 1.2).

Method. Each run is a fresh subprocess, one answer each, so both sides pay the same process and model-load costs
(which are not counted). A round runs each side once; the order of mixrun and raw flips every round (mixrun first,
then raw first), so drift in the machine's load hits both alike; ``--warmup`` rounds are run first and thrown away
(page cache, CPU frequency).

- mixrun: the real CLI, ``python -m mixrun.cli chat MODEL --prompt TEXT --json --temperature 0 --max-tokens N
  --threads T --ctx 4096`` (plus the sampling values below, passed explicitly). Its ``--json`` stats are measured
  inside ``LlamaCppEngine.generate`` on the consumer side of ``Llama.generate``: ``prefill_s`` from just before
  ``Llama.generate`` is called to the first token (TTFT, model load excluded), ``decode_s`` from the first token to
  the last, so every per-token cost mixrun adds (end-of-generation check, detokenize, UTF-8 decode, stop-string
  scan, the chat session writing the piece) falls inside ``decode_s``.
- raw: a child process that loads ``llama_cpp.Llama`` with exactly the keyword arguments ``mixrun chat`` passes on
  this machine: ``n_ctx``, ``n_threads``, seed, ``verbose=False`` and whatever its plan adds (``mixrun chat`` plans
  on the detected machine; on a CPU-only box that is ``n_gpu_layers=0, flash_attn=True``). They are learned once,
  before the rounds, by running the same CLI command with ``llama_cpp.Llama`` replaced by a stub that prints its
  arguments and exits, so both sides run the same llama.cpp graph however the CLI computes them. It renders the same
  message through the model's own chat template with the same sandboxed renderer (``mixrun.chat.ChatTemplate``,
  the GGUF's ``tokenizer.chat_template``, bos/eos text from the vocab), tokenizes it the same way
  (``special=True``, bos as the GGUF's ``add_bos_token`` says) and loops over ``Llama.generate(tokens, ...)`` with
  the same sampler settings, doing only what any caller must: stop at an end-of-generation token (a precomputed
  set) and at N tokens; the text is detokenized once, after the clock stops.
  TTFT and decode are timed exactly as mixrun times them: decode tok/s = (N - 1) / (t_last - t_first).

A third side, ``raw-defaults`` (on unless ``--no-raw-defaults``), runs the same loop with llama-cpp-python's
default keyword arguments (no plan: flash attention off), so the table also shows what mixrun's plan itself is
worth against what a bare ``Llama(model, n_ctx, n_threads)`` user gets. It is not part of the verdict: the bars
are about mixrun's overhead, which only the same-configuration pair isolates. Its answer may differ in the last
digits of the logits and so in the text.

The prompt token counts of both sides are reported and must match, and with temperature 0 both sides must produce
the same answer (checked); a run is only a fair comparison when both stopped at N tokens (stop reason "length").
For each round the ratios mixrun/raw are taken (decode tok/s and TTFT); the verdict uses the median of the per-round
ratios. Other programs' load on a small shared machine comes in bursts that can slow one run five-fold, so the
medians are taken over the undisturbed rounds: those in which mixrun and raw each ran within ``--within`` (20%) of
their own best decode tok/s and TTFT (each side held to its own best, so a side that is always slower is not thrown
out for it); when fewer than a third of the rounds (or 3) are undisturbed, over all of them. The median ratios over
all rounds are printed as well, and so are the medians of each side with the ratio of those medians, and the best
run of each side (fastest decode, shortest TTFT) with their ratio.

A noise-free figure for the same overhead: after the rounds, ``--probe`` (on by default) loads the model in this
process through mixrun's backend, replaces ``Llama.generate`` with a generator that replays the raw side's recorded
tokens, and times mixrun's answer loop (``chat_session.answer``: fit the prompt, render, tokenize,
``LlamaCppEngine.generate``, write the pieces) over them. With llama.cpp's compute taken out, the engine's own
``decode_s`` is what mixrun adds to a decode step, per token, and the rest of the answer's wall time is what it adds
around the generation; divided by the raw side's median step time it is the overhead the bar is about.

mixrun's own TTFT figure leaves out what it does before calling ``Llama.generate``: rendering the template and
tokenizing the prompt (once more to check it fits the context). The raw child times the same render + tokenize
once and reports it as ``prep ms``, so the size of what both TTFT figures leave out is on the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
_MARK = "@@chat_overhead@@ "
DECODE_BAR = 0.97  # mixrun/raw decode tok/s: overhead under 3%
TTFT_BAR = 1.2  # mixrun/raw time to first token
N_CTX = 4096
# mixrun chat's default sampler settings, passed explicitly to both sides (temperature 0 makes them greedy, but
# llama-cpp-python still runs the repeat-penalty sampler, so both sides must carry the same value)
SAMPLING = {"top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.1}
PROMPT = "Write a long, detailed essay about the history of the Roman Empire, from its founding to its fall."


# --- the raw sides (child process) ----------------------------------------------------------------------------


def _raw_child(cfg_json: str) -> None:
    """Runs in the subprocess: load, render and tokenize, stream N tokens greedily, print the figures as JSON."""
    import llama_cpp

    from mixrun.backends.llamacpp_cpu import finding
    from mixrun.backends.llamacpp_load import llama_params

    cfg = json.loads(cfg_json)
    with llama_params(llama_cpp, extra_buffers=finding().extra_buffers):  # what mixrun chat loads with on this CPU
        llm = llama_cpp.Llama(model_path=cfg["model"], **cfg["llama_kwargs"])
    from mixrun.backends.template import ChatTemplate

    def piece(tok: int) -> str:
        return "" if tok < 0 else llm.detokenize([tok], special=True).decode("utf-8", errors="replace")

    vocab = llm._model.vocab
    eog = {t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)}
    bos = piece(llm.token_bos())
    template = ChatTemplate(llm.metadata.get("tokenizer.chat_template"), cfg["model"], bos, piece(llm.token_eos()))
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"

    t_prep = time.perf_counter()
    text = template.render([{"role": "user", "content": cfg["prompt"]}])
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=add_bos and not (bos and text.startswith(bos)),
                          special=True)
    prep_s = time.perf_counter() - t_prep

    n_max, out = cfg["max_tokens"], []
    stop_reason, t_first, t_last = "length", None, None
    t0 = time.perf_counter()
    for tok in llm.generate(tokens, temp=0.0, **cfg["sampling"]):
        now = time.perf_counter()
        if t_first is None:
            t_first = now
        t_last = now
        if tok in eog:
            stop_reason = "eos"
            break
        out.append(tok)
        if len(out) >= n_max:
            break
    prefill_s = (t_first - t0) if t_first is not None else 0.0
    decode_s = (t_last - t_first) if t_first is not None else 0.0
    steps = len(out) - 1
    res = {"prompt_tokens": len(tokens), "completion_tokens": len(out), "prefill_s": prefill_s,
           "decode_s": decode_s, "decode_tok_s": steps / decode_s if steps > 0 and decode_s > 0 else 0.0,
           "stop_reason": stop_reason, "prep_s": prep_s,
           "answer": llm.detokenize(out).decode("utf-8", errors="replace").strip(), "tokens": out}
    print(_MARK + json.dumps(res), flush=True)
    llm.close()


# --- the parent ---------------------------------------------------------------------------------------------


def mixrun_cli_args(model: str, prompt: str, threads: int, max_tokens: int) -> list[str]:
    args = ["chat", model, "--prompt", prompt, "--json", "--temperature", "0", "--max-tokens", str(max_tokens),
            "--threads", str(threads), "--ctx", str(N_CTX)]
    for k, v in SAMPLING.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def mixrun_llama_kwargs(model: str, prompt: str, threads: int, max_tokens: int) -> dict[str, Any]:
    """Every keyword argument ``mixrun chat`` gives ``llama_cpp.Llama`` on this machine (``model_path`` aside).

    The real CLI runs (``python -m mixrun.cli chat ...``, the same arguments as the timed runs) up to its
    ``Llama(...)`` call, which is replaced by one that prints its keyword arguments and ends the process.
    """
    code = "\n".join([
        "import json, os, runpy, sys, llama_cpp",
        "def record(*args, **kwargs):",
        "    kwargs.pop('model_path', None)",
        f"    print({_MARK!r} + json.dumps(kwargs), flush=True)",
        "    os._exit(0)",
        "llama_cpp.Llama = record",
        "sys.argv = ['mixrun'] + sys.argv[1:]",
        "runpy.run_module('mixrun.cli', run_name='__main__')",
    ])
    proc = subprocess.run([sys.executable, "-c", code, *mixrun_cli_args(model, prompt, threads, max_tokens)],
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
    if not lines:
        raise SystemExit(f"could not learn mixrun's Llama arguments (exit {proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return json.loads(lines[-1][len(_MARK):])


def run_raw(model: str, prompt: str, max_tokens: int, llama_kwargs: dict[str, Any]) -> dict[str, Any]:
    cfg = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "sampling": SAMPLING,
           "llama_kwargs": llama_kwargs}
    code = f"import sys; sys.path.insert(0, {str(_HERE)!r}); import chat_overhead as m; m._raw_child(sys.argv[1])"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True,
                          timeout=600)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"raw llama-cpp-python run failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return {**json.loads(lines[-1][len(_MARK):]), "wall_s": wall}


def run_mixrun(model: str, prompt: str, threads: int, max_tokens: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "mixrun.cli", *mixrun_cli_args(model, prompt, threads, max_tokens)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"mixrun chat failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    out = json.loads(proc.stdout)
    return {**out["stats"], "answer": out["answer"], "wall_s": wall}


def run_pair(i: int, model: str, prompt: str, threads: int, max_tokens: int, plan_kwargs: dict[str, Any],
             raw_defaults: bool) -> dict[str, Any]:
    """One run of each side; the order flips with ``i`` (and the optional third side takes turns at every place)."""
    sides: list[tuple[str, Any]] = [
        ("mixrun", lambda: run_mixrun(model, prompt, threads, max_tokens)),
        ("raw", lambda: run_raw(model, prompt, max_tokens, plan_kwargs))]
    if i % 2:
        sides.reverse()
    if raw_defaults:
        plain = {"n_ctx": N_CTX, "n_threads": threads, "verbose": False}
        sides.insert(i // 2 % 3, ("raw-defaults", lambda: run_raw(model, prompt, max_tokens, plain)))
    res: dict[str, Any] = {name: fn() for name, fn in sides}
    m, r = res["mixrun"], res["raw"]
    res["order"] = [name for name, _ in sides]
    if raw_defaults:
        d = res["raw-defaults"]
        res["decode_ratio_vs_defaults"] = m["decode_tok_s"] / d["decode_tok_s"] if d["decode_tok_s"] else float("nan")
        res["ttft_ratio_vs_defaults"] = m["prefill_s"] / d["prefill_s"] if d["prefill_s"] else float("nan")
    res["decode_ratio"] = m["decode_tok_s"] / r["decode_tok_s"] if r["decode_tok_s"] else float("nan")
    res["ttft_ratio"] = m["prefill_s"] / r["prefill_s"] if r["prefill_s"] else float("nan")
    res["same_answer"] = m["answer"] == r["answer"]
    return res


def undisturbed(pairs: list[dict[str, Any]], within: float) -> list[dict[str, Any]]:
    """The rounds in which mixrun and raw each ran within ``within`` of their own best decode rate and TTFT.

    Each side is held to its own best run, so a side that is slower in every round is not thrown out for it; what
    goes is a round that another program's burst of load slowed on one side or both.
    """
    if within >= 1:
        return list(pairs)
    ok = []
    best = {s: (max(p[s]["decode_tok_s"] for p in pairs), min(p[s]["prefill_s"] for p in pairs))
            for s in ("mixrun", "raw")}
    for p in pairs:
        if all(p[s]["decode_tok_s"] >= (1 - within) * best[s][0] and p[s]["prefill_s"] <= best[s][1] / (1 - within)
               for s in ("mixrun", "raw")):
            ok.append(p)
    return ok


def probe_overhead(model: str, prompt: str, threads: int, max_tokens: int, llama_kwargs: dict[str, Any],
                   tokens: list[int], runs: int = 30) -> dict[str, float]:
    """mixrun's own cost per token and per answer, with llama.cpp's compute replaced by ``tokens`` (see above)."""
    import io

    from mixrun.backends.base import Sampling
    from mixrun.backends.llamacpp import LlamaCppEngine
    from mixrun.chat.conversation import Conversation, answer

    extra = {k: v for k, v in llama_kwargs.items() if k not in ("n_ctx", "n_threads", "seed", "verbose")}
    engine = LlamaCppEngine(model, n_ctx=N_CTX, n_threads=threads, kwargs=extra)
    try:
        engine.llm.generate = lambda _tokens, **_kw: iter(tokens)  # the instance attribute shadows the method
        sampling = Sampling(temperature=0.0, max_tokens=max_tokens, **SAMPLING)
        per_token, around = [], []
        for _ in range(runs):
            conv = Conversation()
            conv.add("user", prompt)
            t0 = time.perf_counter()
            stats = answer(engine, conv, sampling, io.StringIO(), lambda m: None)
            wall = time.perf_counter() - t0
            per_token.append(stats.decode_s / max(stats.completion_tokens - 1, 1))
            around.append(wall - stats.decode_s)
    finally:
        engine.close()
    return {"per_token_us": statistics.median(per_token) * 1e6, "per_answer_ms": statistics.median(around) * 1e3,
            "tokens": len(tokens)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help=".gguf path (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for every side (default 2)")
    ap.add_argument("--max-tokens", type=int, default=256, help="tokens to generate (default 256)")
    ap.add_argument("--repeats", type=int, default=7, help="measured rounds (default 7)")
    ap.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted (default 1)")
    ap.add_argument("--prompt", default=PROMPT, help="the user message (pick one the model answers at length)")
    ap.add_argument("--no-raw-defaults", dest="raw_defaults", action="store_false",
                    help="leave out the third side (raw llama-cpp-python with its default keyword arguments)")
    ap.add_argument("--within", type=float, default=0.2,
                    help="a round is undisturbed when mixrun and raw each ran within this fraction of their own "
                         "best decode tok/s and TTFT (default 0.2; 1 counts every round)")
    ap.add_argument("--no-probe", dest="probe", action="store_false",
                    help="skip the in-process measurement of mixrun's per-token cost")
    ap.add_argument("--json", action="store_true", help="print every run and the summary as JSON")
    args = ap.parse_args()
    if args.model is None:
        from mixrun.bundled import default_model

        args.model = default_model()
    plan_kwargs = mixrun_llama_kwargs(args.model, args.prompt, args.threads, args.max_tokens)
    load_before = os.getloadavg()
    run = lambda i: run_pair(i, args.model, args.prompt, args.threads, args.max_tokens, plan_kwargs,  # noqa: E731
                             args.raw_defaults)
    for i in range(args.warmup):
        run(i)
    pairs = []
    for i in range(args.repeats):
        pairs.append(run(i))
        if not args.json:
            p = pairs[-1]
            print(f"round {i + 1}/{args.repeats} ({' '.join(p['order'])}): decode mixrun "
                  f"{p['mixrun']['decode_tok_s']:.1f} raw {p['raw']['decode_tok_s']:.1f} tok/s "
                  f"(x{p['decode_ratio']:.3f}), TTFT mixrun {p['mixrun']['prefill_s'] * 1e3:.1f} "
                  f"raw {p['raw']['prefill_s'] * 1e3:.1f} ms (x{p['ttft_ratio']:.3f})", file=sys.stderr)
    load_after = os.getloadavg()

    sides = ["mixrun", "raw"] + (["raw-defaults"] if args.raw_defaults else [])
    clean = undisturbed(pairs, args.within)
    counted = clean if len(clean) >= max(3, len(pairs) // 3) else pairs

    def med(side: str, key: str) -> float:
        return statistics.median(p[side][key] for p in counted)

    summary: dict[str, Any] = {
        side: {"prompt_tokens": sorted({p[side]["prompt_tokens"] for p in pairs}),
               "completion_tokens": sorted({p[side]["completion_tokens"] for p in pairs}),
               "stop_reasons": sorted({p[side]["stop_reason"] for p in pairs}),
               "decode_tok_s": med(side, "decode_tok_s"), "ttft_ms": med(side, "prefill_s") * 1e3,
               "decode_s": med(side, "decode_s"), "wall_s": med(side, "wall_s"),
               "best_decode_tok_s": max(p[side]["decode_tok_s"] for p in pairs),
               "best_ttft_ms": min(p[side]["prefill_s"] for p in pairs) * 1e3}
        for side in sides}
    summary["raw"]["prep_ms"] = med("raw", "prep_s") * 1e3
    ratios = {key: statistics.median(p[key] for p in counted) for key in pairs[0] if "ratio" in key}
    ratios_all = {key: statistics.median(p[key] for p in pairs) for key in pairs[0] if "ratio" in key}
    decode_ratio, ttft_ratio = ratios["decode_ratio"], ratios["ttft_ratio"]
    same = all(p["same_answer"] for p in pairs)
    fair = (summary["mixrun"]["prompt_tokens"] == summary["raw"]["prompt_tokens"] and same
            and summary["mixrun"]["completion_tokens"] == summary["raw"]["completion_tokens"] == [args.max_tokens])
    summary.update({
        "rounds": len(pairs), "undisturbed_rounds": len(clean), "counted_rounds": len(counted),
        "counted": "undisturbed" if counted is clean else "all",
        "ratios_median_of_rounds": ratios, "ratios_median_of_all_rounds": ratios_all,
        "decode_ratio_of_medians": summary["mixrun"]["decode_tok_s"] / summary["raw"]["decode_tok_s"],
        "ttft_ratio_of_medians": summary["mixrun"]["ttft_ms"] / summary["raw"]["ttft_ms"],
        "decode_ratio_of_bests": summary["mixrun"]["best_decode_tok_s"] / summary["raw"]["best_decode_tok_s"],
        "ttft_ratio_of_bests": summary["mixrun"]["best_ttft_ms"] / summary["raw"]["best_ttft_ms"],
        "decode_overhead_pct": (1 - decode_ratio) * 100,
        "decode_pass": decode_ratio >= DECODE_BAR, "ttft_pass": ttft_ratio <= TTFT_BAR,
        "same_answer_all_rounds": same, "fair": fair,
    })
    if args.probe:
        probe = probe_overhead(args.model, args.prompt, args.threads, args.max_tokens, plan_kwargs,
                               pairs[-1]["raw"]["tokens"])
        step_us = 1e6 / summary["raw"]["decode_tok_s"]
        probe["pct_of_raw_decode_step"] = probe["per_token_us"] / step_us * 100
        probe["pct_of_raw_ttft"] = probe["per_answer_ms"] / summary["raw"]["ttft_ms"] * 100
        summary["probe"] = probe
    config = {"model": args.model, "threads": args.threads, "max_tokens": args.max_tokens, "repeats": args.repeats,
              "warmup": args.warmup, "prompt": args.prompt, "n_ctx": N_CTX,
              "sampling": {"temperature": 0, **SAMPLING}, "plan_llama_kwargs": plan_kwargs, "cpu": _cpu_model(),
              "cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after}
    if args.json:
        print(json.dumps({"config": config, "rounds": pairs, "summary": summary}, indent=2))
        return

    print(f"{Path(args.model).name}, {args.threads} threads, {args.max_tokens} tokens, temperature 0, "
          f"{args.repeats} rounds ({args.warmup} warm-up); {config['cpu']}, {config['cpus']} CPUs, "
          f"load {load_before[0]:.2f} -> {load_after[0]:.2f}")
    print(f"mixrun calls Llama({', '.join(f'{k}={v!r}' for k, v in plan_kwargs.items())}); raw does the same"
          + (f", raw-defaults Llama(n_ctx={N_CTX}, n_threads={args.threads}, verbose=False)" if args.raw_defaults
             else ""))
    heads = {"mixrun": "mixrun chat", "raw": "raw (same kw)", "raw-defaults": "raw-defaults"}
    print(f"{'':18}" + "".join(f" {heads[s]:>14}" for s in sides) + f" {'mixrun/raw':>11}"
          + (f" {'mixrun/defaults':>16}" if args.raw_defaults else ""))

    def row(label: str, cells: list[str], r: str = "", rd: str = "") -> None:
        print(f"{label:18}" + "".join(f" {c:>14}" for c in cells) + f" {r:>11}"
              + (f" {rd:>16}" if args.raw_defaults else ""))

    ints = lambda vs: ",".join(map(str, vs))  # noqa: E731
    row("prompt tokens", [ints(summary[s]["prompt_tokens"]) for s in sides])
    row("completion tokens", [ints(summary[s]["completion_tokens"]) for s in sides])
    row("stop reason", [",".join(summary[s]["stop_reasons"]) for s in sides])
    row("decode tok/s", [f"{summary[s]['decode_tok_s']:.1f}" for s in sides], f"{decode_ratio:.3f}",
        f"{ratios.get('decode_ratio_vs_defaults', 0):.3f}")
    row("TTFT ms", [f"{summary[s]['ttft_ms']:.1f}" for s in sides], f"{ttft_ratio:.3f}",
        f"{ratios.get('ttft_ratio_vs_defaults', 0):.3f}")
    row("best decode tok/s", [f"{summary[s]['best_decode_tok_s']:.1f}" for s in sides],
        f"{summary['decode_ratio_of_bests']:.3f}")
    row("best TTFT ms", [f"{summary[s]['best_ttft_ms']:.1f}" for s in sides], f"{summary['ttft_ratio_of_bests']:.3f}")
    row("process wall s", [f"{summary[s]['wall_s']:.2f}" for s in sides],
        f"{summary['mixrun']['wall_s'] / summary['raw']['wall_s']:.3f}")
    which = (f"the {len(counted)} undisturbed rounds (of {len(pairs)}; within {args.within:.0%} of each side's best)"
             if counted is clean else f"all {len(pairs)} rounds ({len(clean)} undisturbed: too few to count alone)")
    print(f"medians over {which}; over all rounds: decode ratio {ratios_all['decode_ratio']:.3f}, "
          f"TTFT ratio {ratios_all['ttft_ratio']:.3f}")
    print(f"(decode and TTFT ratios: median of per-round ratios; ratio of medians: decode "
          f"{summary['decode_ratio_of_medians']:.3f}, TTFT {summary['ttft_ratio_of_medians']:.3f}; "
          f"render + tokenize, left out of every TTFT: {summary['raw']['prep_ms']:.2f} ms)")
    if args.probe:
        pr = summary["probe"]
        print(f"in-process probe (llama.cpp compute replaced by the {pr['tokens']} recorded tokens): mixrun adds "
              f"{pr['per_token_us']:.1f} us per token = {pr['pct_of_raw_decode_step']:.2f}% of a raw decode step, "
              f"and {pr['per_answer_ms']:.2f} ms per answer around the generation = {pr['pct_of_raw_ttft']:.2f}% "
              f"of the raw TTFT")
    print(f"mixrun and raw gave the same answer in every round: {'yes' if same else 'NO'}")
    print(f"decode overhead {summary['decode_overhead_pct']:+.1f}% (bar: under 3%): "
          f"{'PASS' if summary['decode_pass'] else 'FAIL'}")
    print(f"TTFT ratio {ttft_ratio:.3f} (bar: <= {TTFT_BAR}): {'PASS' if summary['ttft_pass'] else 'FAIL'}")
    if not fair:
        print("warning: mixrun and raw did not run the same prompt tokens / answer / token count: not comparable")


if __name__ == "__main__":
    main()
