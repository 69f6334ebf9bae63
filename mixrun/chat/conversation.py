"""A conversation and the answer loop over any Engine, shared by ``mixrun chat`` and the TUI."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TextIO

from mixrun.backends.base import Engine, Sampling, Stats
from mixrun.backends.template import MAX_TOKEN_CHARS, TemplateError, context_chars
from mixrun.errors import MixrunError, where


@dataclass
class Conversation:
    """The messages so far; the system prompt is kept apart so ``/reset`` keeps it."""

    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def add(self, role: str, content: str) -> None:
        self.turns.append({"role": role, "content": content})

    def reset(self) -> None:
        self.turns.clear()

    def drop_oldest_exchange(self) -> bool:
        """Forget the oldest user/assistant pair; False when nothing is left to drop."""
        if len(self.turns) <= 1:
            return False
        del self.turns[:2]
        return True

    def to_json(self) -> dict[str, Any]:
        return {"system": self.system, "messages": list(self.turns)}


class PromptTooLong(MixrunError):
    """The newest message alone leaves no room in the context for even one answer token."""


class TemplateRefused(TemplateError, PromptTooLong):
    """The model's chat template failed on this conversation (a TemplateError naming the model file). Like
    :class:`PromptTooLong`, the newest message was taken back, so a session that catches that goes on."""


def fit_prompt(engine: Engine, conv: Conversation, sampling: Sampling, notify: Any) -> str:
    """Render the conversation, dropping the oldest exchanges while it leaves no room to answer.

    The number to drop is found by bisection, so a long loaded transcript costs a few renders, not one per
    exchange. When even the newest message alone does not fit, that message is taken back out of the conversation
    (the session goes on without it) and :class:`PromptTooLong` is raised."""
    n_ctx = engine.info.n_ctx
    want = min(sampling.max_tokens, max(n_ctx // 4, 16))

    def render(drop: int) -> tuple[str, int]:
        try:
            prompt = engine.template.render(_messages_without(conv, drop))
        except TemplateError as e:  # the model's template fails on this turn: take it back, the session goes on
            if conv.turns and conv.turns[-1]["role"] == "user":
                conv.turns.pop()
            raise TemplateRefused(str(e)) from None
        if len(prompt) > context_chars(n_ctx):  # cannot fit: spare the tokenizer (it aborts on ~300 MB)
            return prompt, len(prompt) // MAX_TOKEN_CHARS
        used = engine.count_tokens(prompt)
        if not used:  # nothing to prefill: llama-cpp-python would fail an assert
            if conv.turns and conv.turns[-1]["role"] == "user":
                conv.turns.pop()
            raise TemplateRefused(where(engine.info.model, "the prompt is no tokens at all in this model's "
                                                           "vocabulary (nothing to answer)"))
        return prompt, used

    prompt, used = render(0)
    if used + want <= n_ctx:
        return prompt
    exchanges = max(len(conv.turns) - 1, 0) // 2  # the newest turn is never dropped
    best: tuple[int, tuple[str, int]] | None = None
    lo, hi = 1, exchanges  # the fewest drops that fit lies in [lo, hi], if any does
    while lo <= hi:
        mid = (lo + hi) // 2
        attempt = render(mid)
        if attempt[1] + want <= n_ctx:
            best, hi = (mid, attempt), mid - 1
        else:
            lo = mid + 1
    if best is not None:
        drop, (prompt, used) = best
    else:
        drop = exchanges
        if drop:
            prompt, used = render(drop)
    if drop:
        del conv.turns[:2 * drop]
        notify("the conversation outgrew the context: dropped the oldest exchange" if drop == 1 else
               f"the conversation outgrew the context: dropped the oldest {drop} exchanges")
    if used >= n_ctx:
        newest = conv.turns.pop() if conv.turns and conv.turns[-1]["role"] == "user" else None
        size = f"{len(newest['content']):,} characters, " if newest else ""
        raise PromptTooLong(f"prompt: too long for the context ({size}{used:,} tokens with the template; "
                            f"the context holds {n_ctx:,}): give a larger --ctx or a shorter prompt")
    return prompt


def _messages_without(conv: Conversation, drop: int) -> list[dict[str, str]]:
    """The messages with the oldest ``drop`` user/assistant exchanges left out."""
    head = [{"role": "system", "content": conv.system}] if conv.system else []
    return head + conv.turns[2 * drop:]


def answer(engine: Engine, conv: Conversation, sampling: Sampling, out: TextIO, notify: Any) -> Stats:
    """Stream one answer to ``out`` and add it to the conversation (partial, if interrupted)."""
    stats = Stats()
    pieces: list[str] = []
    try:
        prompt = fit_prompt(engine, conv, sampling, notify)
        for piece in engine.generate(prompt, sampling, stats):
            pieces.append(piece)
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        stats.stop_reason = "interrupted"
    conv.add("assistant", "".join(pieces).strip())
    return stats
