"""Hostile chat templates: every one is refused in one line naming the model file, within time and memory bounds,
and the session goes on where it can (section 3 of "Hostile input and faults")."""

from __future__ import annotations

import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pexpect
import pytest

import gguf_factory
from mixrun.backends.template import MAX_TOKEN_CHARS, ChatTemplate, TemplateError, context_chars
from mixrun.chat.conversation import Conversation, PromptTooLong, fit_prompt

HI = [{"role": "user", "content": "hi"}]
SECONDS = 0.5  # the render time budget in the unit tests (the CLI runs with the default)
PEAK_BYTES = 64 << 20  # no hostile render may allocate more than this on the Python heap

HOSTILE = {
    "nested loops": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "string repeat": "{{ 'ab' * 150000000 }}",
    "joined range repeat": "{{ range(99999)|join(',') * 1000 }}",
    "huge repeat": "{{ 'a' * 10**10 }}",
    "huge range": "{% for i in range(10**10) %}{% endfor %}",
    "huge power": "{{ 10 ** 1000000 }}",
    "list repeat": "{{ ['a' * 10000] * 100000 }}",
    "center filter": "{{ 'a'|center(10**9) }}",
    "center literal": "{{ 'a'|center(1000000000) }}",
    "center method": "{{ 'a'.center(10**9) }}",
    "str.format width": "{{ '{:>1000000000}'.format(1) }}",
    "percent width": "{{ '%01000000000d' % 1 }}",
    "format filter width": "{{ '%01000000000d'|format(1) }}",
    "replace method": "{{ ('a' * 100000).replace('a', 'b' * 100000) }}",
    "replace filter": "{{ ('a' * 100000)|replace('a', 'b' * 100000) }}",
    "indent": "{{ ('a\\n' * 100000)|indent(1000) }}",
    "join generator": "{{ range(99999)|map('center', 1000)|join }}",
    "namespace doubling": "{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                          "{% endfor %}{{ ns.s }}",
    "macro doubling": "{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% else %}{{ s }}{% endif %}{% endmacro %}"
                      "{{ f('a', 64) }}",
    "nested list growth": "{% set ns = namespace(l=[]) %}{% for i in range(99999) %}{% set ns.l = [ns.l, ns.l] %}"
                          "{% endfor %}{{ ns.l }}",
    "batch": "{{ [1]|batch(10**9, 'x')|list }}",
    "lipsum": "{{ lipsum(10**9) }}",
    "recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "empty output": "{{ '' }}",
    "syntax error": "{% for %}",
    "deep nesting": "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
}


def _one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and text.startswith("evil.gguf: chat template"), text
    return text


@pytest.mark.parametrize("source", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_template_is_one_line_within_bounds(source: str) -> None:
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(TemplateError) as info:
            ChatTemplate(source, "evil.gguf", seconds=SECONDS, max_chars=context_chars(4096)).render(HI)
        elapsed = time.monotonic() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    _one_line(info.value)
    assert elapsed < SECONDS + 1.0, elapsed
    assert peak < PEAK_BYTES, peak


def test_the_limits_name_what_stopped_the_render() -> None:
    def refusal(source: str) -> str:
        with pytest.raises(TemplateError) as info:
            ChatTemplate(source, "evil.gguf", seconds=SECONDS).render(HI)
        return _one_line(info.value)

    assert "took longer than 0.5 s" in refusal(HOSTILE["nested loops"])
    assert "300,000,000 characters" in refusal(HOSTILE["string repeat"])
    assert "range() of 10,000,000,000 items" in refusal(HOSTILE["huge range"])
    assert "does not parse (line 1:" in refusal(HOSTILE["syntax error"])
    assert "rendered nothing" in refusal(HOSTILE["empty output"])


def test_real_templates_still_render() -> None:
    source = ("{{ bos_token }}{% for i in range(messages|length) %}{% set m = messages[i] %}"
              "{{ '<|%s|>'|format(m['role']) }}{{ m['content']|trim|indent(2) }}{{ ', '.join(['a', 'b']) }}"
              "{{ '-' * 3 }}{{ '{}!'.format(i) }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tpl = ChatTemplate(source, "ok.gguf", bos_token="<s>", max_chars=context_chars(256))
    long = [{"role": "user", "content": "x" * 2_000_000}]  # the messages' own text never counts against the budget
    assert tpl.render(HI) == "<s><|user|>hia, b---0!<|assistant|>"
    assert len(tpl.render(long)) > 2_000_000
    assert ChatTemplate(None, "ok.gguf").render(HI).endswith("<|im_start|>assistant\n")


def test_a_timed_out_render_leaves_nothing_behind() -> None:
    tpl = ChatTemplate(HOSTILE["nested loops"], "evil.gguf", seconds=0.2)
    with pytest.raises(TemplateError):
        tpl.render(HI)
    fast = ChatTemplate(None, "ok.gguf", seconds=0.2)
    for _ in range(200):  # renders that end just before their watchdog fires never see its exception later
        fast.render(HI)
    time.sleep(0.4)
    assert sum(range(1000)) == 499500


def test_the_watchdog_stops_a_render_in_a_worker_thread() -> None:
    """The TUI renders in a Textual worker thread: the watchdog stops that thread's render, no other."""
    import threading

    caught: list[BaseException] = []

    def work() -> None:
        try:
            ChatTemplate(HOSTILE["nested loops"], "evil.gguf", seconds=0.2).render(HI)
        except TemplateError as e:
            caught.append(e)

    worker = threading.Thread(target=work)
    t0 = time.monotonic()
    worker.start()
    while worker.is_alive():  # the main thread keeps running meanwhile, untouched
        time.sleep(0.01)
    assert time.monotonic() - t0 < 1.5 and len(caught) == 1 and "took longer than 0.2 s" in str(caught[0])


class _Engine:
    """Just what fit_prompt needs: a template, a context, a tokenizer that counts characters."""

    def __init__(self, template: ChatTemplate, n_ctx: int = 256) -> None:
        from types import SimpleNamespace

        self.template = template
        self.info = SimpleNamespace(n_ctx=n_ctx, model="evil.gguf")
        self.tokenized: list[int] = []

    def count_tokens(self, text: str) -> int:
        self.tokenized.append(len(text))
        return len(text)


def test_a_failing_template_takes_the_message_back() -> None:
    from mixrun.backends.base import Sampling

    source = "{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no') }}{% endif %}" \
             "{{ m['content'] }}{% endfor %}"
    conv = Conversation(turns=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    conv.add("user", "boom")
    with pytest.raises(TemplateError) as info:
        fit_prompt(_Engine(ChatTemplate(source, "evil.gguf")), conv, Sampling(max_tokens=8), print)
    assert isinstance(info.value, PromptTooLong)  # the REPL catches that and goes on: the message was not sent
    assert str(info.value) == "evil.gguf: the chat template raised: no"
    assert [m["content"] for m in conv.turns] == ["a", "b"]


def test_a_prompt_of_no_tokens_is_refused_and_taken_back() -> None:
    from mixrun.backends.base import Sampling

    engine = _Engine(ChatTemplate(None, "evil.gguf"))
    engine.count_tokens = lambda text: 0  # type: ignore[method-assign]  (a vocabulary that spells none of it)
    conv = Conversation()
    conv.add("user", "hi")
    with pytest.raises(PromptTooLong, match=r"^evil\.gguf: the prompt is no tokens at all"):
        fit_prompt(engine, conv, Sampling(max_tokens=8), print)
    assert conv.turns == []


def test_a_render_the_context_cannot_hold_is_not_tokenized() -> None:
    from mixrun.backends.base import Sampling

    engine = _Engine(ChatTemplate(None, "ok.gguf"), n_ctx=64)
    conv = Conversation()
    conv.add("user", "x" * (64 * MAX_TOKEN_CHARS + 1))
    with pytest.raises(PromptTooLong, match="too long for the context"):
        fit_prompt(engine, conv, Sampling(max_tokens=8), print)
    assert engine.tokenized == [] and conv.turns == []


def test_llama_cpp_python_does_not_compile_the_template(tmp_path: Path) -> None:
    """Llama(...) compiles the file's templates with unbounded Jinja2; mixrun loads without that, then refuses in
    one line with its own sandbox, and puts llama-cpp-python's formatter back."""
    from llama_cpp import llama_chat_format

    from mixrun.backends.llamacpp import LlamaCppEngine

    real = llama_chat_format.Jinja2ChatFormatter
    path = gguf_factory.write_model(tmp_path / "evil.gguf", n_vocab=64, merges=True, chat_template="{% for %}")
    with pytest.raises(TemplateError) as info:
        LlamaCppEngine(str(path), n_ctx=256, show_progress=False)
    assert str(info.value).startswith(f"{path}: chat template does not parse") and "\n" not in str(info.value)
    assert llama_chat_format.Jinja2ChatFormatter is real


CLI_CASES = ["nested loops", "string repeat", "joined range repeat", "huge repeat", "syntax error", "empty output"]


@pytest.fixture(scope="module")
def evil_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("evil")
    models = {name: gguf_factory.write_model(d / f"{name.replace(' ', '-')}.gguf", n_vocab=64, merges=True,
                                             chat_template=HOSTILE[name]) for name in CLI_CASES}
    models["boom"] = gguf_factory.write_model(
        d / "boom.gguf", n_vocab=64, merges=True,
        chat_template="{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('boom') }}"
                      "{% endif %}{{ m['content'] }}{% endfor %}")
    return models


@pytest.mark.parametrize(("name", "backend"), [(name, "llama.cpp") for name in CLI_CASES]
                         + [("syntax error", "torch"), ("string repeat", "torch")])
def test_cli_refuses_a_hostile_template_in_one_line(evil_models: dict[str, Path], name: str, backend: str) -> None:
    """Both backends load the vocabulary through llama-cpp-python, which would compile the template unbounded."""
    path = evil_models[name]
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "mixrun.cli", "chat", str(path), "--prompt", "hi", "--ctx", "2048",
                        "--max-tokens", "4", "--backend", backend], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 30
    assert r.returncode == 2, r.stderr  # an exit status, not a signal (SIGABRT would be -6)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"mixrun: {path}: "), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_interactive_chat_survives_a_template_that_fails(evil_models: dict[str, Path]) -> None:
    child = pexpect.spawn(sys.executable, ["-m", "mixrun.cli", "chat", str(evil_models["boom"]), "--ctx", "2048",
                                           "--max-tokens", "4"], encoding="utf-8", timeout=60, dimensions=(40, 200))
    try:
        child.expect(">>> ")
        child.sendline("boom")
        child.expect("the chat template raised: boom")
        child.expect(">>> ")  # the session goes on
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
