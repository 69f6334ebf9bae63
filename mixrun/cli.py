"""The ``mixrun`` command: parse, call, print. No logic of its own.

Start-up stays fast because nothing heavy is imported here: each command imports what it needs when it runs.
Every :class:`~mixrun.errors.MixrunError` becomes ``mixrun: FILE: problem`` on stderr and its exit code;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mixrun import __version__
from mixrun.bundled import default_model
from mixrun.vocab import AUTO, Backend, KVType, Split, choices

SPLITS = choices(Split, auto=True)
BACKENDS = choices(Backend, auto=True)
# Piped input is a prompt, not a corpus: more than this is refused before anything is tokenized.
MAX_STDIN_BYTES = 4 * 1024 * 1024
# ggml's GGML_MAX_N_THREADS: more threads crash or hang inside llama.cpp.
MAX_THREADS = 512


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``mixrun chat: error: argument --top-p: ...``) and exit 2."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        from mixrun.fsutil import shown

        self.exit(2, f"{self.prog}: error: {shown(message, 500)} (see {self.prog} --help)\n")


def _number(kind: type, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Any:
    """An argparse ``type=`` for a finite ``kind`` (int or float) within ``[lo, hi]`` (``(lo, hi]`` with
    ``lo_open``); the error names the bound."""
    import math

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        low_bad = lo is not None and (value <= lo if lo_open else value < lo)
        if low_bad or (hi is not None and value > hi):
            low = "" if lo is None else f"{'over' if lo_open else 'at least'} {show(lo)}"
            high = "" if hi is None else f"at most {show(hi)}"
            must = " and ".join(x for x in (low, high) if x)
            raise argparse.ArgumentTypeError(f"{show(value)} is out of range (must be {must})")
        return value

    def show(x: float) -> str:
        return f"{x:,}" if isinstance(x, int) else f"{x:g}"


    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def _text(limit: int, *, empty: bool = True) -> Any:
    """An argparse ``type=`` for text: valid UTF-8 (argv bytes that are not arrive as surrogates), at most ``limit``
    characters, and not empty unless ``empty``."""

    def parse(text: str) -> str:
        if not text and not empty:
            raise argparse.ArgumentTypeError("must not be empty")
        try:
            text.encode("utf-8")
        except UnicodeError:
            raise argparse.ArgumentTypeError("not valid UTF-8 text") from None
        if len(text) > limit:
            raise argparse.ArgumentTypeError(f"{len(text):,} characters is too long (limit {limit:,})")
        return text

    parse.__name__ = "text"
    return parse


def read_stdin_prompt(limit: int = MAX_STDIN_BYTES) -> str:
    """The prompt piped on stdin: UTF-8, at most ``limit`` bytes (read no further), not empty. MixrunError if not."""
    from mixrun.errors import MixrunError

    stream = getattr(sys.stdin, "buffer", None)
    data = stream.read(limit + 1) if stream is not None else sys.stdin.read(limit + 1).encode("utf-8", "replace")
    if len(data) > limit:
        raise MixrunError(f"stdin: more than {limit:,} bytes of input (the limit for a prompt); give a shorter one")
    try:
        prompt = data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise MixrunError(f"stdin: not valid UTF-8 text (byte {e.start:,})") from None
    if not prompt:
        raise MixrunError("stdin: no prompt given (empty input)")
    return prompt


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


# ---- commands ----------------------------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    from mixrun.model.gguf import read_spec

    spec = read_spec(args.model or default_model())
    if args.json:
        _print_json(spec.to_json(with_tensors=not args.no_tensors))
    else:
        from mixrun.render import render_spec

        render_spec(spec, show_tensors=args.tensors)
    return 0


def cmd_profile_list(args: argparse.Namespace) -> int:
    from mixrun.render import render_profile_list
    from mixrun.rig.profile import bundled_profiles, user_profile_dir, user_profiles

    render_profile_list(list(bundled_profiles()), list(user_profiles()), user_profile_dir())
    return 0


def cmd_profile_show(args: argparse.Namespace) -> int:
    from mixrun.rig.profile import dump_profile, load_profile

    prof = load_profile(args.profile)
    if args.json:
        _print_json(prof.model_dump(mode="json", exclude_none=True))
    elif args.toml:
        sys.stdout.write(dump_profile(prof))
    else:
        from mixrun.render import render_profile

        render_profile(prof)
    return 0


def cmd_profile_validate(args: argparse.Namespace) -> int:
    from mixrun.errors import ProfileError
    from mixrun.rig.profile import load_profile

    failed = 0
    for ref in args.files:
        try:
            prof = load_profile(ref)
        except ProfileError as e:
            failed += 1
            print(f"mixrun: {e}", file=sys.stderr)
        else:
            print(f"{ref}: ok ({prof.name}: {len(prof.devices)} devices, {len(prof.links)} links)")
    return 2 if failed else 0


def cmd_profile_schema(args: argparse.Namespace) -> int:
    from mixrun.rig.profile import RigProfile

    _print_json(RigProfile.model_json_schema())
    return 0


def cmd_profile_detect(args: argparse.Namespace) -> int:
    from mixrun.render import progress_status
    from mixrun.rig.profile import dump_profile, save_profile
    from mixrun.run import detect_here

    with progress_status() as progress:
        progress("probing llama.cpp on this CPU")
        prof, notes = detect_here(measure=not args.no_measure, progress=progress, name=args.name)
    for note in notes:
        print(f"mixrun: note: {note}", file=sys.stderr)
    if args.output:
        path = save_profile(prof, args.output)
        print(f"wrote {path}", file=sys.stderr)
    else:
        sys.stdout.write(dump_profile(prof))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from mixrun.model.gguf import read_spec
    from mixrun.planner import PlanRequest, plan
    from mixrun.rig.profile import load_profile

    prof = load_profile(args.profile)
    spec = read_spec(args.model or default_model())
    req = PlanRequest(ctx=args.ctx, kv_type=args.kv_type, split=args.split, backend=args.backend,
                      ubatch=args.ubatch, flash_attn=not args.no_flash_attn, cpu_offload=args.offload,
                      llamacpp_build=args.llamacpp_build)
    report = plan(prof, spec, req)
    if args.json:
        _print_json(report.to_json())
    else:
        from mixrun.render import render_plan

        render_plan(report, all_devices=args.all)
    return 0 if report.best is not None and report.best.fits else 3


def _plan_for_chat(args: argparse.Namespace, model: str) -> tuple[Any, Any]:
    """Plan the model on ``--profile`` (or on this machine, detected) and return the profile and the candidate to
    run (:func:`mixrun.run.choose`: refused when it does not fit, unless ``--force``)."""
    from mixrun.model.gguf import read_spec
    from mixrun.planner import PlanRequest, plan
    from mixrun.rig.profile import load_profile
    from mixrun.run import choose, detect_here

    if args.profile:
        profile = load_profile(args.profile)
    else:
        profile, _notes = detect_here(measure=False)
    report = plan(profile, read_spec(model), PlanRequest(ctx=args.ctx, split=args.split, backend=args.backend))
    choice = choose(report, model, force=args.force, simulate=args.simulate)
    if not args.quiet:
        for note in choice.notes:
            print(f"mixrun: {note if note.startswith('warning: ') else 'note: ' + note}", file=sys.stderr)
        best = choice.candidate
        if args.profile and best is not None:
            print(f"mixrun: plan: {best.label}, predicted {best.decode_tok_s:.1f} tok/s ({best.why})",
                  file=sys.stderr)
    return profile, choice.candidate


def cmd_chat(args: argparse.Namespace) -> int:
    from mixrun.backends.base import Sampling
    from mixrun.chat.conversation import Conversation
    from mixrun.chat.repl import interactive, one_shot
    from mixrun.run import LaunchOptions, launch

    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                        repeat_penalty=args.repeat_penalty, seed=args.seed, max_tokens=args.max_tokens,
                        stop=tuple(args.stop or ()))
    prompt = args.prompt
    if prompt is None:
        if sys.stdin is None or sys.stdin.closed:
            from mixrun.errors import MixrunError

            raise MixrunError("stdin: closed, and no --prompt given")
        if not sys.stdin.isatty():
            prompt = read_stdin_prompt()
    model = args.model or default_model()
    profile, candidate = _plan_for_chat(args, model)
    opts = LaunchOptions(n_ctx=args.ctx, n_threads=args.threads, seed=args.seed, simulate=args.simulate,
                         force=args.force, debug=args.debug)
    engine = launch(model, candidate, profile, opts, backend=None if args.backend == AUTO else Backend(args.backend))
    try:
        conv = Conversation(system=args.system)
        if prompt is not None:
            return one_shot(engine, conv, prompt, sampling, as_json=args.json, quiet=args.quiet)
        return interactive(engine, conv, sampling, quiet=args.quiet)
    finally:
        engine.close()


def cmd_bench(args: argparse.Namespace) -> int:
    from mixrun.bench.command import bench_command
    from mixrun.bench.results import BenchConfig

    cfg = BenchConfig(tokens=args.tokens, prompt_tokens=args.prompt_tokens, repeats=args.repeats, ctx=args.ctx,
                      threads=args.threads, simulate=args.simulate)
    return bench_command(args.model or default_model(), args.profile, cfg, splits=args.splits, backend=args.backend,
                         record=args.record, as_json=args.json, debug=args.debug)


def cmd_tui(args: argparse.Namespace) -> int:
    from mixrun.tui import run

    return run(args)


# ---- parser ------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mixrun", description="Plan and run GGUF models on asymmetric multi-GPU rigs.")
    p.add_argument("--version", action="version", version=f"mixrun {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("inspect", help="read a GGUF (file, split part, or URL) into a model spec")
    s.add_argument("model", nargs="?", help=".gguf path or http(s) URL (default: the bundled SmolLM2)")
    s.add_argument("--json", action="store_true", help="print the spec as JSON")
    s.add_argument("--tensors", action="store_true", help="list every tensor (human output)")
    s.add_argument("--no-tensors", action="store_true", help="leave the tensor list out of --json")
    s.set_defaults(func=cmd_inspect)

    pl = sub.add_parser("plan", help="the best split of a model over a rig, predicted before loading")
    pl.add_argument("model", nargs="?", help=".gguf path or URL (default: the bundled SmolLM2)")
    pl.add_argument("--profile", "-p", required=True, help="rig profile: name or .toml path")
    pl.add_argument("--ctx", type=_number(int, 16, 1 << 24), default=4096, help="context length in tokens (default 4096)")
    pl.add_argument("--split", default="auto", choices=SPLITS)
    pl.add_argument("--backend", default="auto", choices=BACKENDS)
    pl.add_argument("--kv-type", default=KVType.F16.value, choices=choices(KVType), help="KV cache type")
    pl.add_argument("--ubatch", type=_number(int, 1, 1 << 16), default=512,
                    help="micro-batch size (llama.cpp -ub), 1 to 65536")
    pl.add_argument("--no-flash-attn", action="store_true", help="plan without flash attention")
    pl.add_argument("--offload", action="store_true", help="let llama.cpp run the first layers on the CPU")
    pl.add_argument("--llamacpp-build", type=_number(int, 1, 1 << 20), default=None, metavar="N",
                    help="predict llama.cpp for this build number (`llama-server --version`; default: a 2025-26 "
                         "build); builds before b3210 prefilled through cuBLAS")
    pl.add_argument("--all", action="store_true", help="show every candidate's devices, not just the chosen one")
    pl.add_argument("--json", action="store_true", help="print the report as JSON (contract 2)")
    pl.set_defaults(func=cmd_plan)

    c = sub.add_parser("chat", help="chat with a model (default: the bundled SmolLM2)")
    c.add_argument("model", nargs="?", help=".gguf path (default: the bundled SmolLM2-135M-Instruct)")
    c.add_argument("--backend", default="auto", choices=BACKENDS)
    c.add_argument("--profile", "-p", help="plan on this rig profile first; refuse a plan that does not fit")
    c.add_argument("--split", default="auto", choices=SPLITS,
                   help="with --profile: force a split mode")
    c.add_argument("--force", action="store_true", help="load even when the plan does not fit")
    c.add_argument("--simulate", action="store_true",
                   help="torch backend: one CPU process stands in for each planned device (any plan runs here)")
    c.add_argument("--prompt", type=_text(MAX_STDIN_BYTES),
                   help="answer this once and exit (stdin that is not a terminal works too, up to 4 MiB)")
    c.add_argument("--system", type=_text(MAX_STDIN_BYTES), help="system prompt")
    c.add_argument("--ctx", type=_number(int, 16, 1 << 24), default=4096,
                   help="context length in tokens, 16 to 16,777,216 (default 4096)")
    c.add_argument("--threads", type=_number(int, 1, MAX_THREADS), default=None,
                   help=f"CPU threads, 1 to {MAX_THREADS} (default: llama.cpp's choice)")
    c.add_argument("--max-tokens", type=_number(int, 1, 1 << 24), default=512, help="at least 1 (default 512)")
    c.add_argument("--temperature", type=_number(float, 0, 100), default=0.7,
                   help="0 to 100; 0 is greedy and deterministic")
    c.add_argument("--top-p", type=_number(float, 0, 1), default=0.95, help="0 to 1")
    c.add_argument("--top-k", type=_number(int, 0, 1 << 20), default=40, help="0 (off) or more")
    c.add_argument("--min-p", type=_number(float, 0, 1), default=0.05, help="0 to 1")
    c.add_argument("--repeat-penalty", type=_number(float, 0, 100, lo_open=True), default=1.1,
                   help="over 0, at most 100; 1 is off")
    c.add_argument("--seed", type=_number(int, 0, (1 << 32) - 1), default=None, help="0 to 4294967295")
    c.add_argument("--stop", action="append", type=_text(1000, empty=False), help="stop at this text (repeatable)")
    c.add_argument("--json", action="store_true", help="with --prompt or piped input: print answer and stats as JSON")
    c.add_argument("--quiet", action="store_true", help="no stats line")
    c.set_defaults(func=cmd_chat)

    b = sub.add_parser("bench", help="run each candidate that fits, measure it, compare with the prediction")
    b.add_argument("model", nargs="?", help=".gguf path (default: the bundled SmolLM2)")
    b.add_argument("--profile", "-p", required=True, help="rig profile: name or .toml path")
    b.add_argument("--splits", help="comma-separated splits to measure (none,layer,row,tensor,hybrid; default: all)")
    b.add_argument("--backend", default="auto", choices=BACKENDS)
    b.add_argument("--tokens", type=_number(int, 1, 1 << 16), default=64, help="tokens to decode per run (default 64)")
    b.add_argument("--prompt-tokens", type=_number(int, 1, 1 << 20), default=256, help="prompt length in tokens (default 256)")
    b.add_argument("--repeats", type=_number(int, 1, 1000), default=3, help="measured runs per candidate (default 3)")
    b.add_argument("--ctx", type=_number(int, 16, 1 << 24), default=4096, help="context length in tokens (default 4096)")
    b.add_argument("--threads", type=_number(int, 1, MAX_THREADS), default=None,
                   help=f"CPU threads, 1 to {MAX_THREADS} (default: as `mixrun chat`, the backend's own choice)")
    b.add_argument("--simulate", action="store_true",
                   help="run the torch candidates on CPU processes, one per planned device (llama.cpp ones are skipped)")
    b.add_argument("--record", action="store_true",
                   help="write the results into the profile (a bundled one is copied to your profile dir first)")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.set_defaults(func=cmd_bench)

    t = sub.add_parser("tui", help="plan a rig interactively, then run and watch it (Textual)")
    t.add_argument("model", nargs="?", help=".gguf path (default: the bundled SmolLM2)")
    t.add_argument("--profile", "-p", help="rig profile (default: this machine, detected)")
    t.add_argument("--ctx", type=_number(int, 16, 1 << 24), default=4096, help="context length in tokens (default 4096)")
    t.add_argument("--split", default="auto", choices=SPLITS, help="start with this split chosen")
    t.add_argument("--backend", default="auto", choices=BACKENDS)
    t.add_argument("--simulate", action="store_true", help="run GPU plans on CPU processes, one per planned device")
    t.set_defaults(func=cmd_tui)

    prof = sub.add_parser("profile", help="rig profiles: detect, list, show, validate, schema")
    psub = prof.add_subparsers(dest="profile_command", metavar="ACTION", required=True)
    d = psub.add_parser("detect", help="profile this machine")
    d.add_argument("-o", "--output", help="write the profile to this file (atomically) instead of stdout")
    d.add_argument("--name", help="profile name (default: the host name)")
    d.add_argument("--no-measure", action="store_true", help="skip measurements; use NVML and datasheet figures")
    d.set_defaults(func=cmd_profile_detect)
    psub.add_parser("list", help="bundled and user profiles").set_defaults(func=cmd_profile_list)
    sh = psub.add_parser("show", help="render a profile")
    sh.add_argument("profile", help="profile name or .toml path")
    sh.add_argument("--json", action="store_true")
    sh.add_argument("--toml", action="store_true")
    sh.set_defaults(func=cmd_profile_show)
    v = psub.add_parser("validate", help="check profile files")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.set_defaults(func=cmd_profile_validate)
    psub.add_parser("schema", help="print the JSON Schema of the profile format").set_defaults(func=cmd_profile_schema)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from mixrun.errors import MixrunError
    from mixrun.rig.probe import cuda_order_env

    cuda_order_env()  # before llama.cpp or torch starts CUDA: its GPU k is then the profile's k-th

    try:
        return args.func(args)
    except MixrunError as e:
        if args.debug:
            raise
        print(f"mixrun: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("mixrun: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
