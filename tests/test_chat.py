"""``mixrun chat`` on the bundled model: templates in a sandbox, scripted answers, and a real terminal session."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from mixrun.backends.template import ChatTemplate, TemplateError
from mixrun.chat.conversation import Conversation
from mixrun.chat.repl import load_transcript
from mixrun.errors import MixrunError

MALICIOUS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}",
    "{{ joiner.__init__.__globals__['os'].system('touch {marker}') }}",
    "{{ namespace.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ raise_exception.__globals__['__builtins__']['__import__']('os').system('touch {marker}') }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{% for c in ().__class__.__base__.__subclasses__() %}{% if c.__name__ == 'Popen' %}"
    "{{ c(['touch', '{marker}']) }}{% endif %}{% endfor %}",
    "{{ self.__init__.__globals__.__builtins__.__import__('subprocess').call(['touch', '{marker}']) }}",
    "{{ lipsum.__globals__['os'].system('touch {marker}') }}",
    "{{ messages.append({'role': 'x'}) }}",  # mutation of the caller's data is refused too
]


@pytest.mark.parametrize("source", MALICIOUS)
def test_malicious_templates_run_nothing(tmp_path: Path, source: str) -> None:
    marker = tmp_path / "pwned"
    tpl = ChatTemplate(source.replace("{marker}", str(marker)), "evil.gguf")
    messages = [{"role": "user", "content": "hi"}]
    try:
        out = tpl.render(messages)
    except TemplateError as e:
        assert str(e).startswith("evil.gguf: ")
    else:
        assert "Popen" not in out and "subclasses" not in out.lower()
    assert not marker.exists()
    assert messages == [{"role": "user", "content": "hi"}]


def test_fallback_and_real_template() -> None:
    tpl = ChatTemplate(None, "x.gguf")
    assert tpl.is_fallback
    text = tpl.render([{"role": "user", "content": "hello"}])
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(TemplateError, match=r"x\.gguf: chat template does not parse"):
        ChatTemplate("{% for %}", "x.gguf")
    with pytest.raises(TemplateError, match="the chat template raised: no system"):
        ChatTemplate("{{ raise_exception('no system') }}", "x.gguf").render([])


def test_conversation_and_transcripts(tmp_path: Path) -> None:
    conv = Conversation(system="be brief")
    conv.add("user", "a")
    conv.add("assistant", "b")
    conv.add("user", "c")
    assert conv.messages()[0] == {"role": "system", "content": "be brief"}
    assert conv.drop_oldest_exchange() and [m["content"] for m in conv.turns] == ["c"]
    assert not conv.drop_oldest_exchange()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"messages": [{"role": "root", "content": 1}]}))
    with pytest.raises(MixrunError, match=r"bad\.json: not a mixrun transcript"):
        load_transcript(str(bad))


def _chat(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixrun.cli", "chat", *args], input=stdin, capture_output=True,
                          text=True, timeout=180)


def test_piped_question_prints_just_an_answer() -> None:
    r = _chat("--temperature", "0", "--max-tokens", "48", stdin="What is 2+2?\n")
    assert r.returncode == 0, r.stderr
    assert "4" in r.stdout
    assert ">>>" not in r.stdout and "tok/s" not in r.stdout


def test_greedy_is_deterministic_and_json_has_stats() -> None:
    args = ("--prompt", "Name three colors.", "--temperature", "0", "--max-tokens", "24", "--json")
    a, b = _chat(*args), _chat(*args)
    assert a.returncode == 0, a.stderr
    da, db = json.loads(a.stdout), json.loads(b.stdout)
    assert da["answer"] == db["answer"] and da["answer"]
    s = da["stats"]
    assert s["prompt_tokens"] > 5 and 1 <= s["completion_tokens"] <= 24
    assert s["decode_tok_s"] > 0 and s["stop_reason"] in ("eos", "length")


def test_stop_string_and_missing_model(tmp_path: Path) -> None:
    r = _chat("--prompt", "Count from 1 to 20 separated by commas.", "--temperature", "0", "--stop", "5",
              "--max-tokens", "80")
    assert r.returncode == 0 and "5" not in r.stdout and "6" not in r.stdout
    r = _chat(str(tmp_path / "none.gguf"), "--prompt", "hi")
    assert r.returncode == 2 and r.stderr.strip() == f"mixrun: {tmp_path / 'none.gguf'}: no such file"


def test_terminal_session(tmp_path: Path) -> None:
    """A real pseudo-terminal: question, streaming, /stats, Ctrl-C mid-answer, /save then /load, Ctrl-D."""
    child = pexpect.spawn(sys.executable, ["-m", "mixrun.cli", "chat", "--temperature", "0", "--max-tokens",
                                           "400"], encoding="utf-8", timeout=120, dimensions=(40, 120))
    try:
        child.expect("mixrun chat: .*SmolLM2")
        child.expect(">>> ")
        child.sendline("What is the capital of France?")
        child.expect("Paris")
        child.expect(r"decode [0-9.]+ tok/s")
        child.expect(">>> ")
        child.sendline("/stats")
        child.expect(r"tokens, prefill [0-9.]+ tok/s")
        child.expect(">>> ")
        child.sendline("/plan")
        child.expect(r"llama.cpp, CPU only \(none, llama.cpp\)")
        child.expect(r"stage 0: layers 0-29 on cpu")
        child.expect(r"predicted: decode [0-9.]+ tok/s")
        child.expect(r"measured: decode [0-9.]+ tok/s")
        child.expect(">>> ")
        child.sendline("Write a very long story about a dragon, with many chapters.")
        child.expect("chapters.\r\n")  # the echoed question
        child.expect(r"\w+ \w+ \w+ \w+")  # the answer is streaming
        child.sendintr()
        child.expect(r"\(stopped\)")
        child.expect(">>> ")
        transcript = tmp_path / "t.json"
        child.sendline(f"/save {transcript}")
        child.expect("saved 4 messages")
        child.expect(">>> ")
        child.sendline("/reset")
        child.expect("conversation reset")
        child.sendline(f"/load {transcript}")
        child.expect("loaded 4 messages")
        child.expect(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    saved = json.loads(transcript.read_text())
    assert saved["messages"][0]["content"] == "What is the capital of France?"
    assert "Paris" in saved["messages"][1]["content"]
    assert saved["messages"][3]["role"] == "assistant" and saved["messages"][3]["content"]


def test_plan_that_does_not_fit_is_refused_before_loading(tmp_path: Path) -> None:
    """A 70B-shaped file whose tensor data is a hole: refused by the planner, so llama.cpp never reads it."""
    import gguf_factory

    big = gguf_factory.write_model(tmp_path / "big.gguf", "llama", qtype="Q4_K_M", sparse=True,
                                   **gguf_factory.LLAMA3_70B)
    r = _chat(str(big), "--profile", "2x-5060ti-pcie", "--prompt", "hi")
    assert r.returncode == 2
    assert "does not fit 2x-5060ti-pcie" in r.stderr and "short by" in r.stderr and "--force" in r.stderr
    ok = _chat("--profile", "cpu-only", "--prompt", "Say hi.", "--temperature", "0", "--max-tokens", "8")
    assert ok.returncode == 0 and ok.stdout.strip()
    assert "mixrun: plan: llama.cpp, CPU only" in ok.stderr


# ---- hostile paths and input: the session and the user's work survive --------------------------------------------


class _Info:
    model, backend, plan, n_ctx, notes = "m.gguf", "fake", None, 256, ()


class _Template:
    def render(self, messages: list[dict[str, str]]) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages)


class _Engine:
    """Counts a token per character and answers "ok": enough to drive the chat loop without a model."""

    info, template = _Info(), _Template()

    def count_tokens(self, text: str) -> int:
        return len(text)

    def generate(self, prompt: str, sampling, stats):
        stats.completion_tokens = 1
        yield "ok"

    def telemetry(self):  # pragma: no cover - /stats is not driven here
        raise NotImplementedError


def _session(monkeypatch: pytest.MonkeyPatch, lines: list[str]) -> tuple[int, Conversation, str]:
    import io

    from mixrun.backends.base import Sampling
    from mixrun.chat import repl

    feed = iter(lines)

    def fake_input(prompt: str = "") -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    conv = Conversation()
    code = repl.interactive(_Engine(), conv, Sampling(max_tokens=8), quiet=True)
    return code, conv, out.getvalue()


def test_failed_save_and_load_keep_the_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    bad = [str(tmp_path), "/proc/version", str(tmp_path / ("x" * 300)), str(tmp_path / "no" / "dir" / "t.json"),
           "/dev/null", f"{tmp_path}/nul\0name"]
    lines = ["hello", *(f"/save {b}" for b in bad), f"/load {deep}", f"/load {fifo}", "/load /dev/zero", "again"]
    code, conv, out = _session(monkeypatch, lines)
    assert code == 0
    assert [m["content"] for m in conv.turns] == ["hello", "ok", "again", "ok"]  # nothing lost
    assert out.count("mixrun: ") == len(bad) + 3 and "Traceback" not in out
    assert "nested too deeply" in out and "not a regular file" in out
    assert not (tmp_path / "no").exists()  # /save creates no folders
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_save_writes_through_a_symlink_and_keeps_the_mode(tmp_path: Path) -> None:
    from mixrun.chat.repl import save_transcript

    target = tmp_path / "real.json"
    target.write_text("{}")
    target.chmod(0o640)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    conv = Conversation(system="s", turns=[{"role": "user", "content": "hi"}])
    save_transcript(str(link), conv)
    assert link.is_symlink() and load_transcript(str(link)).turns == conv.turns
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json"]  # no temporary file left
    fresh = tmp_path / "fresh.json"
    save_transcript(str(fresh), conv)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_message_longer_than_the_context(monkeypatch: pytest.MonkeyPatch) -> None:
    code, conv, out = _session(monkeypatch, ["x" * 1000, "short"])
    assert code == 0 and "too long for the context" in out
    assert [m["content"] for m in conv.turns] == ["short", "ok"]


def test_long_history_is_trimmed_in_few_renders() -> None:
    from mixrun.backends.base import Sampling
    from mixrun.chat.conversation import fit_prompt

    renders = []

    class Counting(_Template):
        def render(self, messages):
            renders.append(len(messages))
            return super().render(messages)

    engine = _Engine()
    engine.template = Counting()
    conv = Conversation(turns=[{"role": r, "content": "abcd"} for _ in range(5000) for r in ("user", "assistant")])
    conv.add("user", "last")
    notes: list[str] = []
    prompt = fit_prompt(engine, conv, Sampling(max_tokens=8), notes.append)
    assert len(prompt) + 8 <= 256 and conv.turns[-1]["content"] == "last"
    assert len(renders) < 20 and len(notes) == 1 and "dropped the oldest" in notes[0]


@pytest.mark.parametrize(("args", "flag"), [
    (["--threads", "65536"], "--threads"), (["--threads", "16384"], "--threads"), (["--temperature", "-1"],
    "--temperature"), (["--top-p", "2"], "--top-p"), (["--max-tokens", "0"], "--max-tokens"),
    (["--min-p", "nan"], "--min-p"), (["--top-k", "-1"], "--top-k"), (["--repeat-penalty", "0"], "--repeat-penalty"),
    (["--seed", "-5"], "--seed"), (["--ctx", "0"], "--ctx"), (["--stop", ""], "--stop"),
])
def test_bad_arguments_one_line_naming_the_flag(args: list[str], flag: str) -> None:
    r = _chat(*args, "--prompt", "hi")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"mixrun chat: error: argument {flag}: "), r.stderr


def test_hostile_stdin_is_one_line() -> None:
    r = subprocess.run([sys.executable, "-m", "mixrun.cli", "chat", "--quiet"], input=b"hi \xff\xfe there",
                       capture_output=True, timeout=180)
    assert r.returncode == 2 and r.stderr == b"mixrun: stdin: not valid UTF-8 text (byte 3)\n"
    r = subprocess.run([sys.executable, "-m", "mixrun.cli", "chat", "--quiet"], input=b"a" * (5 << 20),
                       capture_output=True, timeout=180)
    assert r.returncode == 2 and r.stderr.count(b"\n") == 1 and b"more than 4,194,304 bytes" in r.stderr


def test_prompt_longer_than_the_context_is_an_error() -> None:
    r = _chat("--quiet", "--ctx", "256", stdin="hello world " * 300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("mixrun: prompt: too long for the context")
