"""Chat-template rendering, shared by every backend: the template is part of the model file.

Chat templates come from the GGUF (``tokenizer.chat_template``) and are untrusted: they render in Jinja2's
``ImmutableSandboxedEnvironment``, which refuses attribute access to internals (``__globals__``, ``__subclasses__``,
``mro``...) and any mutation of the objects passed in. A file without a template gets ChatML.
"""

from __future__ import annotations

import datetime

from mixrun.errors import GGUFError, where

# ChatML, the format SmolLM2, Qwen and many others use; used when a GGUF carries no template.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MAX_TEMPLATE_CHARS = 256 * 1024


class TemplateError(GGUFError):
    """A chat template that does not parse or refuses to render."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"the chat template raised: {message}")


class ChatTemplate:
    """A compiled, sandboxed chat template."""

    def __init__(self, source: str | None, origin: str, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.origin = origin
        self.is_fallback = not source
        text = source or FALLBACK_TEMPLATE
        if len(text) > MAX_TEMPLATE_CHARS:
            raise TemplateError(where(origin, f"chat template of {len(text):,} characters is too large"))
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, autoescape=False)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(str(fmt)[:64])
        self.bos_token, self.eos_token = bos_token, eos_token
        try:
            self._template = env.from_string(text)
        except TemplateSyntaxError as e:
            raise TemplateError(where(origin, f"chat template does not parse (line {e.lineno}: {e.message})")) from None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError as JinjaError
        from jinja2.exceptions import SecurityError

        try:
            return self._template.render(messages=[dict(m) for m in messages], bos_token=self.bos_token,
                                         eos_token=self.eos_token, add_generation_prompt=add_generation_prompt)
        except SecurityError as e:
            raise TemplateError(where(self.origin, f"chat template tried something unsafe and was stopped ({e})")) \
                from None
        except TemplateError as e:
            raise TemplateError(where(self.origin, str(e))) from None
        except (JinjaError, TypeError, ValueError, KeyError, IndexError, RecursionError) as e:
            raise TemplateError(where(self.origin, f"chat template failed to render ({type(e).__name__}: {e})")) \
                from None
