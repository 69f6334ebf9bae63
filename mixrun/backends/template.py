"""Chat-template rendering, shared by every backend: the template is part of the model file.

Chat templates come from the GGUF (``tokenizer.chat_template``) and are untrusted: they render in Jinja2's
``ImmutableSandboxedEnvironment``, which refuses attribute access to internals (``__globals__``, ``__subclasses__``,
``mro``...) and any mutation of the objects passed in. A file without a template gets ChatML.

The sandbox stops unsafe access, not unbounded work, so rendering is bounded too (:class:`_BoundedSandbox`):

- a time budget (:data:`RENDER_SECONDS`): a watchdog raises in the rendering thread, because an empty nested
  ``for`` loop runs plain Python that no sandbox hook sees;
- a size budget, in characters beyond the messages' own text: string and list repetition, ``+``, ``%``, the
  widening string methods and filters (``center``, ``replace``, ``join``, ``format``...) are sized *before* they
  allocate, every call's arguments and result and every attribute read are checked, and the output is counted
  chunk by chunk; ``range`` is capped at :data:`MAX_RANGE` items and integer powers at :data:`MAX_INT_BITS`.

Every failure is a :class:`TemplateError` naming the model file, never a traceback.
"""

from __future__ import annotations

import ctypes
import datetime
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any

from mixrun.errors import GGUFError, where

# ChatML, the format SmolLM2, Qwen and many others use; used when a GGUF carries no template.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MAX_TEMPLATE_CHARS = 256 * 1024
RENDER_SECONDS = 1.0  # real templates render a short conversation in milliseconds...
MESSAGE_SECONDS = 0.0005  # ...and 10,000 messages in about 0.2 s: a long transcript gets this much more per message
COMPILE_SECONDS = 10.0
MAX_RENDER_CHARS = 32 * 1024 * 1024  # characters a render may add to the messages' text, whatever the context
MAX_TOKEN_CHARS = 128  # more characters than any token of a common vocabulary spells
MAX_RANGE = 100_000  # Jinja2's own sandbox limit, kept; range(99999) nested twice is the time budget's job
MAX_INT_BITS = 64 * 1024  # an integer wider than this (~20,000 digits) has no place in a prompt


def context_chars(n_ctx: int) -> int:
    """The most characters a prompt of ``n_ctx`` tokens can spell: a longer render cannot fit, so it need not be
    tokenized (llama.cpp's tokenizer aborts the process on a string of a few hundred MB)."""
    return n_ctx * MAX_TOKEN_CHARS


class TemplateError(GGUFError):
    """A chat template that does not parse or refuses to render."""


class _Overtime(BaseException):
    """Raised by the watchdog inside the rendering thread; a BaseException so no ``except Exception`` in a filter
    swallows it."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"the chat template raised: {message}")


def _size(obj: Any, limit: int, known: dict[int, int] | None = None, memo: dict[int, int] | None = None) -> int:
    """About how many characters ``obj`` prints as (strings: exactly their length; containers: their items, shared
    ones counted each time they appear, as ``str()`` would print them); counting stops past ``limit``. ``known``:
    sizes already counted, by ``id`` (the messages), so a long transcript is not walked at every use."""
    if isinstance(obj, (str, bytes)):
        return len(obj)
    if known and id(obj) in known:
        return known[id(obj)]
    if isinstance(obj, dict):
        items: Iterable[Any] = (*obj.keys(), *obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = obj
    else:
        return 1
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    memo[id(obj)] = 1  # a cycle prints as [...]
    total = len(obj)
    for x in items:
        total += _size(x, limit, known, memo)
        if total > limit:
            break
    memo[id(obj)] = total
    return total


_FORMAT_NUMBERS = re.compile(r"\d+")
_PERCENT_SPECS = re.compile(r"%[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?")
_BRACE_SPECS = re.compile(r"\{[^{}]*\}")
_NESTED_SPEC = re.compile(r"\{[^{}]*\{")
UNBOUNDED = 1 << 62


def _format_width(fmt: str, braces: bool) -> int:
    """The widest field a ``%``-format (``braces`` False) or ``str.format`` string asks for; a width taken from the
    arguments (``%*d``, ``{0:{1}}``) counts as unbounded."""
    if braces and _NESTED_SPEC.search(fmt.replace("{{", "").replace("}}", "")):
        return UNBOUNDED
    widest = 0
    for spec in (_BRACE_SPECS if braces else _PERCENT_SPECS).findall(fmt):
        if not braces and "*" in spec:
            return UNBOUNDED
        for n in _FORMAT_NUMBERS.findall(spec):
            widest = max(widest, int(n) if len(n) < 12 else UNBOUNDED)
    return widest


def _too_big(what: str, chars: int, limit: int) -> TemplateError:
    return TemplateError(f"chat template output too large ({what} of {chars:,} characters; the limit for this "
                         f"render is {limit:,})")


_SANDBOX: type | None = None
# the positional parameters of the widening filters, after the context/environment one (Jinja2 3.1)
_FILTER_PARAMS = {"center": ("value", "width"), "indent": ("s", "width"), "wordwrap": ("s", "width", "b", "wrapstring"),
                  "replace": ("s", "old", "new"), "join": ("value", "d"), "batch": ("value", "linecount"),
                  "slice": ("value", "slices")}


def _sandbox_class() -> type:
    """The bounded sandbox class, built once on first use."""
    global _SANDBOX
    if _SANDBOX is not None:
        return _SANDBOX
    from jinja2.compiler import CodeGenerator, optimizeconst
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class SizedConcat(CodeGenerator):
        """Jinja2's code generator, but ``a ~ b`` sizes its parts before joining them: no sandbox hook sees ``~``,
        and a list of shared parts prints far bigger than it is."""

        @optimizeconst
        def visit_Concat(self, node: Any, frame: Any) -> None:  # Jinja2 3.1's, with sized_parts around the parts
            if frame.eval_ctx.volatile:
                func_name = "(markup_join if context.eval_ctx.volatile else str_join)"
            elif frame.eval_ctx.autoescape:
                func_name = "markup_join"
            else:
                func_name = "str_join"
            self.write(f"{func_name}(environment.sized_parts((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write(")))")

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})
        code_generator_class = SizedConcat

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(finalize=self.finalized, **kwargs)
            self.local = threading.local()
            self.globals["range"] = self.bounded_range
            self.globals.pop("lipsum", None)  # lipsum(n=10**9): lorem ipsum has no place in a prompt
            for name, f in list(self.filters.items()):
                self.filters[name] = self.bounded_filter(name, f)

        @property
        def limit(self) -> int:
            return getattr(self.local, "limit", None) or MAX_RENDER_CHARS

        def size(self, obj: Any) -> int:
            return _size(obj, self.limit, getattr(self.local, "known", None))

        def finalized(self, value: Any) -> Any:
            """Every ``{{ }}`` value, before it is made a string: a list built of shared parts prints big."""
            self.check("an output value", self.size(value))
            return value

        def sized_parts(self, parts: tuple[Any, ...]) -> tuple[Any, ...]:
            self.check("a ~ concatenation", sum(self.size(p) for p in parts))
            return parts

        def check(self, what: str, chars: int) -> None:
            if chars > self.limit:
                raise _too_big(what, chars, self.limit)

        def bounded_range(self, *args: int) -> range:
            r = range(*args)
            if len(r) > MAX_RANGE:
                raise TemplateError(f"chat template asked for range() of {len(r):,} items (at most {MAX_RANGE:,})")
            return r

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(n, int) and not isinstance(seq, (int, float)) and n > 0:
                        self.check("a repeated value", self.size(seq) * n)
                if isinstance(left, int) and isinstance(right, int):
                    self.bits(left.bit_length() + right.bit_length())
            elif operator == "**":
                if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                    self.bits(abs(left).bit_length() * right)
            elif operator == "+":
                if not isinstance(left, (int, float)):
                    self.check("a sum", self.size(left) + self.size(right))
            elif operator == "%" and isinstance(left, str):
                self.check("a %-formatted string", len(left) + _format_width(left, braces=False) + self.size(right))
            return super().call_binop(context, operator, left, right)

        def bits(self, bits: int) -> None:
            if bits > MAX_INT_BITS:
                raise TemplateError(f"chat template computes an integer of about {bits:,} bits "
                                    f"(at most {MAX_INT_BITS:,})")

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            for a in (*args, *kwargs.values()):
                __self.check("an argument", __self.size(a))
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str):
                args = __self.check_str_method(owner, getattr(__obj, "__name__", ""), args)
            result = super().call(__context, __obj, *args, **kwargs)
            __self.check("a call's result", __self.size(result))
            return result

        def check_str_method(self, s: str, name: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
            """Size the widening ``str`` methods before they run; ``join``'s items are listed once to count them."""
            if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
                self.check(f"str.{name}()", args[0])
            elif name == "expandtabs":
                tab = args[0] if args and isinstance(args[0], int) else 8
                self.check("str.expandtabs()", len(s) + s.count("\t") * max(tab, 0))
            elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
                hits = len(s) + 1 if not args[0] else s.count(args[0])
                self.check("str.replace()", len(s) + hits * len(args[1]))
            elif name == "join" and args:
                items = self.listed(args[0]) if not isinstance(args[0], (list, tuple)) else args[0]
                self.check("str.join()", self.size(items) + len(s) * len(items))
                args = (items, *args[1:])
            return args

        def bounded_filter(self, name: str, f: Callable[..., Any]) -> Callable[..., Any]:
            """``f`` sized before it runs; ``join``'s items are listed first, so a generator is counted too."""
            import functools

            skip = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0  # the context/environment argument

            @functools.wraps(f)
            def bounded(*args: Any, **kwargs: Any) -> Any:
                head, rest = args[:skip], list(args[skip:])
                if name == "join" and rest and not isinstance(rest[0], (list, tuple, str)):
                    rest[0] = self.listed(rest[0])
                self.check_filter(name, rest, kwargs)
                return f(*head, *rest, **kwargs)

            return bounded

        def listed(self, items: Iterable[Any]) -> list[Any]:
            """``items`` (a generator, say) as a list, refused as soon as they add up to more than the limit."""
            out, total = [], 0
            for x in items:
                total += self.size(x)
                self.check("join()", total)
                out.append(x)
            return out

        def check_filter(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> None:
            """Size a widening filter's output from its arguments (by position or by name)."""
            params = _FILTER_PARAMS.get(name, ("value",))
            a = {**dict(zip(params, args, strict=False)), **kwargs}
            value = a.get(params[0], "")
            size = self.size(value)
            self.check(f"{name}()'s input", size)  # string, tojson, pprint... print what they are given
            if name == "center":
                self.check("center()", a["width"] if isinstance(a.get("width"), int) else size)
            elif name == "indent":
                width = a.get("width", 4)
                pad = width if isinstance(width, int) else self.size(width)
                lines = value.count("\n") + 1 if isinstance(value, str) else 1
                self.check("indent()", size + lines * pad)
            elif name == "wordwrap":
                self.check("wordwrap()", size * (1 + self.size(a.get("wrapstring") or "\n")))
            elif name == "replace" and isinstance(value, str) and isinstance(a.get("old"), str):
                hits = len(value) + 1 if not a["old"] else value.count(a["old"])
                self.check("replace()", size + hits * self.size(a.get("new", "")))
            elif name == "join":
                self.check("join()", size + len(value) * self.size(a.get("d", "")))
            elif name == "format" and isinstance(value, str):
                given = sum(self.size(x) for x in (*args[1:], *kwargs.values()))
                self.check("format()", size + _format_width(value, braces=False) + given)
            elif name in ("batch", "slice"):
                count = a.get("linecount" if name == "batch" else "slices", 1)
                if isinstance(count, int) and count > MAX_RANGE:
                    raise TemplateError(f"chat template asked {name}() for {count:,} parts (at most {MAX_RANGE:,})")

        def getattr(self, obj: Any, attribute: str) -> Any:
            if isinstance(obj, str) and attribute in ("format", "format_map"):  # sized here: the sandbox wraps them
                self.check(f"str.{attribute}()", len(obj) + _format_width(obj, braces=True))
            value = super().getattr(obj, attribute)
            self.check("a value", self.size(value))
            return value

        def getitem(self, obj: Any, argument: Any) -> Any:
            value = super().getitem(obj, argument)
            self.check("a value", self.size(value))
            return value

    _SANDBOX = BoundedSandbox
    return BoundedSandbox


class _Watchdog:
    """Raises :class:`_Overtime` in the thread that entered it once ``seconds`` pass, unless it has left by then.

    The exception is raised asynchronously (``PyThreadState_SetAsyncExc``): a template's pure-Python loop, e.g. an
    empty ``{% for %}`` nested in another, calls no hook that could look at a clock. The lock makes firing and
    leaving exclusive, and leaving clears an exception that was set but not yet raised, so it never escapes later."""

    def __init__(self, seconds: float) -> None:
        self._thread = threading.get_ident()
        self._lock = threading.Lock()
        self._armed = False
        self._fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self._armed = True
        self._timer.start()
        return self

    def _fire(self) -> None:
        with self._lock:
            if self._armed:
                self._armed, self._fired = False, True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread), ctypes.py_object(_Overtime))

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            if self._fired:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread), None)  # NULL: clear it
            self._armed = False
        self._timer.cancel()


class ChatTemplate:
    """A compiled, sandboxed chat template, rendered within a time and a size budget."""

    def __init__(self, source: str | None, origin: str, bos_token: str = "", eos_token: str = "",
                 seconds: float = RENDER_SECONDS, max_chars: int = MAX_RENDER_CHARS) -> None:
        """``seconds``: the time a render may take; ``max_chars``: the characters it may add to the messages'
        own text (capped at :data:`MAX_RENDER_CHARS`; an engine passes :func:`context_chars` of its context)."""
        from jinja2 import TemplateError as JinjaError

        self.origin = origin
        self.is_fallback = not source
        self.seconds = seconds
        self.max_chars = min(max_chars, MAX_RENDER_CHARS)
        text = source or FALLBACK_TEMPLATE
        if len(text) > MAX_TEMPLATE_CHARS:
            raise TemplateError(where(origin, f"chat template of {len(text):,} characters is too large"))
        env = _sandbox_class()(trim_blocks=True, lstrip_blocks=True, autoescape=False)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(str(fmt)[:64])
        self._env = env
        self.bos_token, self.eos_token = bos_token, eos_token
        env.local.limit = MAX_TEMPLATE_CHARS  # filters on constants run while compiling: keep what they fold small
        try:
            with _Watchdog(COMPILE_SECONDS):
                self._template = env.from_string(text)
        except _Overtime:
            raise TemplateError(where(origin, f"chat template took longer than {COMPILE_SECONDS:g} s to compile "
                                              "(stopped)")) from None
        except JinjaError as e:
            line = f"line {e.lineno}: " if getattr(e, "lineno", None) else ""
            raise TemplateError(where(origin, f"chat template does not parse ({line}{e.message})")) from None
        except (RecursionError, MemoryError, SyntaxError, ValueError, OverflowError, TypeError) as e:
            raise TemplateError(where(origin, f"chat template does not parse ({type(e).__name__})")) from None
        finally:
            env.local.limit = None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt for ``messages``. The template may add at most ``self.max_chars`` characters to the messages'
        own text (no value it builds may be larger either) and take at most ``self.seconds`` (plus
        :data:`MESSAGE_SECONDS` a message); TemplateError otherwise, and for a render that is empty (nothing to
        tokenize)."""
        from jinja2 import TemplateError as JinjaError
        from jinja2.exceptions import SecurityError

        copies = [dict(m) for m in messages]
        known = {id(m): _size(m, UNBOUNDED) for m in copies}
        own = known[id(copies)] = sum(known.values()) + len(copies)
        limit = own + self.max_chars
        seconds = self.seconds + MESSAGE_SECONDS * len(copies)
        env = self._env
        saved = getattr(env.local, "limit", None), getattr(env.local, "known", None)
        env.local.limit, env.local.known = limit, known
        try:
            with _Watchdog(seconds):
                chunks: list[str] = []
                total = 0
                for chunk in self._template.generate(messages=copies, bos_token=self.bos_token,
                                                     eos_token=self.eos_token,
                                                     add_generation_prompt=add_generation_prompt):
                    total += len(chunk)
                    if total > limit:
                        raise _too_big("the output", total, limit)
                    chunks.append(chunk)
                text = "".join(chunks)
        except _Overtime:
            raise TemplateError(where(self.origin, f"chat template took longer than {seconds:.1f} s to render "
                                                   "(stopped)")) from None
        except SecurityError as e:
            raise TemplateError(where(self.origin, f"chat template tried something unsafe and was stopped ({e})")) \
                from None
        except TemplateError as e:
            raise TemplateError(where(self.origin, str(e))) from None
        except MemoryError:
            raise TemplateError(where(self.origin, "chat template ran out of memory rendering")) from None
        except (JinjaError, TypeError, ValueError, KeyError, IndexError, RecursionError, OverflowError,
                ArithmeticError, AttributeError) as e:
            raise TemplateError(where(self.origin, f"chat template failed to render ({type(e).__name__}: "
                                                   f"{str(e)[:200]})")) from None
        finally:
            env.local.limit, env.local.known = saved
        if not text:
            raise TemplateError(where(self.origin, "chat template rendered nothing for this conversation"))
        return text
