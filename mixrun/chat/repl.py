"""``mixrun chat``: the interactive loop and the one-shot (scripted) answer, over any Engine.

Interactive: answers stream as tokens arrive; Ctrl-C stops the current answer and keeps the session; Ctrl-D or
``/quit`` leaves. Scripted (``--prompt``, or stdin that is not a terminal): one answer, only the answer on stdout.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from mixrun.backends.base import Engine, Sampling, Stats
from mixrun.chat.conversation import Conversation, PromptTooLong, answer, fit_prompt
from mixrun.errors import MixrunError, where
from mixrun.fsutil import shown

# A transcript /load reads at most this much: enough for any conversation a context can hold, many times over.
MAX_TRANSCRIPT_BYTES = 16 * 1024 * 1024

HELP = """commands:
  /reset          forget the conversation (keeps the system prompt)
  /system TEXT    set the system prompt (and reset)
  /save FILE      write the conversation as JSON
  /load FILE      read a conversation written by /save
  /stats          figures of the last answer
  /plan           the plan this session runs: devices, layers, predicted and measured speed
  /help           this list
  /quit           leave (Ctrl-D works too); Ctrl-C stops an answer"""


def stats_line(stats: Stats) -> str:
    return (f"{stats.completion_tokens} tokens, prefill {stats.prefill_tok_s:.1f} tok/s "
            f"({stats.prompt_tokens} prompt tokens), decode {stats.decode_tok_s:.1f} tok/s")


def one_shot(engine: Engine, conv: Conversation, prompt: str, sampling: Sampling, *, as_json: bool,
             quiet: bool) -> int:
    """Answer ``prompt`` once. A prompt the context cannot hold is an error (exit 2) before anything is printed,
    never an empty answer."""
    conv.add("user", prompt)
    fit_prompt(engine, conv, sampling, lambda m: None)  # raises PromptTooLong
    if not quiet:
        for note in engine.info.notes:
            print(f"mixrun: note: {note}", file=sys.stderr)
    if as_json:
        import io

        buf = io.StringIO()
        stats = answer(engine, conv, sampling, buf, lambda m: None)
        json.dump({"answer": buf.getvalue().strip(), "stats": stats.to_json()}, sys.stdout)
        sys.stdout.write("\n")
        return 0
    stats = answer(engine, conv, sampling, sys.stdout, lambda m: print(f"mixrun: {m}", file=sys.stderr))
    sys.stdout.write("\n")
    if not quiet and sys.stderr.isatty():
        print(f"\x1b[2m{stats_line(stats)}\x1b[0m", file=sys.stderr)
    return 130 if stats.stop_reason == "interrupted" else 0


def interactive(engine: Engine, conv: Conversation, sampling: Sampling, *, quiet: bool) -> int:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    dim, reset = ("\x1b[2m", "\x1b[0m") if sys.stdout.isatty() else ("", "")
    say = lambda m: print(f"{dim}{m}{reset}")  # noqa: E731
    name = Path(engine.info.model).name
    on = engine.info.plan.label if engine.info.plan is not None else engine.info.backend
    say(f"mixrun chat: {name} on {on}, context {engine.info.n_ctx}. /help for commands.")
    for note in engine.info.notes:
        say(f"note: {note}")
    last: Stats | None = None
    while True:
        try:
            line = _read_message()
            line.encode("utf-8")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        except UnicodeError:
            say("mixrun: input: not valid UTF-8 text, ignored (the conversation is kept)")
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            cmd, _, arg = line.strip().partition(" ")
            if cmd in ("/quit", "/exit"):
                return 0
            try:
                msg = _command(cmd, arg.strip(), conv, last, engine)
            except MixrunError as e:
                msg = f"mixrun: {e}"
            except (OSError, ValueError, RecursionError, MemoryError) as e:  # a command fails, the session stays
                msg = f"mixrun: {cmd}: failed ({e.__class__.__name__}: {shown(e)})"
            say(msg)
            continue
        conv.add("user", line)
        try:
            last = answer(engine, conv, sampling, sys.stdout, say)
        except PromptTooLong as e:
            say(f"mixrun: {e} (the message was not sent; the conversation is kept)")
            continue
        try:
            print()
            if last.stop_reason == "interrupted":
                say("(stopped)")
            if not quiet:
                say(stats_line(last))
        except KeyboardInterrupt:
            print()


def _read_message() -> str:
    """One message; a line ending in a backslash continues on the next line."""
    lines = [input(">>> ")]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(input("... "))
    return "\n".join(lines)


def telemetry_lines(engine: Engine) -> str:
    """Per-stage compute time and the bytes each link carried so far, when the engine counts them (torch)."""
    snap = engine.telemetry()
    if not snap.stages:
        return ""
    lines = []
    for i, st in enumerate(snap.stages):
        lines.append(f"\n  stage {i} ({'+'.join(st.devices)}, layers {st.layers[0]}-{st.layers[1] - 1}): "
                     f"{st.last_token_s * 1000:.1f} ms last token, {st.total_s:.2f} s in all")
    for ln in snap.links:
        lines.append(f"\n  {ln.kind} {ln.between[0]} -> {ln.between[1]}: {ln.bytes_total:,} bytes")
    return "".join(lines)


def plan_summary(engine: Engine, last: Stats | None) -> str:
    """The running plan in a few lines: candidate, stages with devices and layers, predicted vs measured."""
    plan = engine.info.plan
    measured = (f"measured: decode {last.decode_tok_s:.1f} tok/s, prefill {last.prefill_tok_s:.1f} tok/s"
                if last and last.completion_tokens else "measured: no answer yet")
    if plan is None:
        return (f"no plan: {engine.info.backend} with its defaults (give --profile to plan)\n{measured}")
    lines = [f"{plan.label} ({plan.split.value}, {plan.backend.value}): {plan.why}"]
    for i, g in enumerate(plan.groups):
        tp = f", TP {g.tp}" if g.tp > 1 else ""
        lines.append(f"  stage {i}: layers {g.layers[0]}-{g.layers[1] - 1} on {'+'.join(g.devices)}{tp}")
    for d in plan.devices:
        lines.append(f"  {d.id}: {d.total_bytes / 2**30:.2f} of {d.capacity_bytes / 2**30:.2f} GiB planned")
    lines.append(f"predicted: decode {plan.decode_tok_s:.1f} tok/s, prefill {plan.prefill_tok_s:.1f} tok/s")
    lines.append(measured)
    return "\n".join(lines)


def _command(cmd: str, arg: str, conv: Conversation, last: Stats | None, engine: Engine) -> str:
    match cmd:
        case "/plan":
            return plan_summary(engine, last)
        case "/help":
            return HELP
        case "/reset":
            conv.reset()
            return "conversation reset"
        case "/system":
            conv.system = arg or None
            conv.reset()
            return "system prompt set" if arg else "system prompt cleared"
        case "/stats":
            return stats_line(last) + telemetry_lines(engine) if last else "no answer yet"
        case "/save":
            if not arg:
                return "usage: /save FILE"
            save_transcript(arg, conv)
            return f"saved {len(conv.turns)} messages to {arg}"
        case "/load":
            if not arg:
                return "usage: /load FILE"
            loaded = load_transcript(arg)
            conv.system, conv.turns = loaded.system, loaded.turns
            return f"loaded {len(conv.turns)} messages from {arg}"
        case _:
            return f"unknown command {cmd} (/help lists them)"


def save_transcript(path: str, conv: Conversation) -> None:
    """Write ``conv`` as JSON to ``path``: atomically, through a symlink to its target, never over anything that is
    not a regular file (a directory, /dev/full) and never creating folders. MixrunError when it cannot."""
    from mixrun.fsutil import atomic_write_text, write_problem

    text = json.dumps(conv.to_json(), indent=2) + "\n"
    try:
        atomic_write_text(path, text, parents=False)
    except OSError as e:
        no_folder = isinstance(e, FileNotFoundError) and not Path(path).parent.is_dir()
        problem = "cannot write (no such folder; /save creates none)" if no_folder else write_problem(e)
        raise MixrunError(where(shown(path), problem)) from None
    except ValueError:  # a NUL character in the name
        raise MixrunError(where(shown(path), "not a usable file name")) from None


def load_transcript(path: str) -> Conversation:
    """The conversation in a file written by ``/save``; at most :data:`MAX_TRANSCRIPT_BYTES`, a regular file only.
    MixrunError for anything else."""
    from mixrun.fsutil import read_bounded

    try:
        data = json.loads(read_bounded(path, MAX_TRANSCRIPT_BYTES).decode("utf-8"))
    except FileNotFoundError:
        raise MixrunError(where(shown(path), "no such file")) from None
    except OSError as e:
        raise MixrunError(where(shown(path), f"cannot read ({e.strerror or e})")) from None
    except RecursionError:
        raise MixrunError(where(shown(path), "not a mixrun transcript (nested too deeply)")) from None
    except (UnicodeDecodeError, ValueError) as e:  # ValueError: JSONDecodeError, or a NUL in the name
        raise MixrunError(where(shown(path), f"not a mixrun transcript ({shown(e)})")) from None
    msgs = data.get("messages") if isinstance(data, dict) else None
    system = data.get("system") if isinstance(data, dict) else None
    ok = isinstance(msgs, list) and all(
        isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
        for m in msgs)
    if not ok or not (system is None or isinstance(system, str)):
        raise MixrunError(where(shown(path),
                                "not a mixrun transcript (expected {system, messages: [{role, content}]})"))
    return Conversation(system=system, turns=[{"role": m["role"], "content": m["content"]} for m in msgs])
