"""A conversation and the answer loop over any Engine, shared by ``mixrun chat`` and the TUI."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TextIO

from mixrun.backends.base import Engine, Sampling, Stats


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


def fit_prompt(engine: Engine, conv: Conversation, sampling: Sampling, notify: Any) -> str:
    """Render the conversation, dropping the oldest exchanges while it leaves no room to answer."""
    want = min(sampling.max_tokens, max(engine.info.n_ctx // 4, 16))
    while True:
        prompt = engine.template.render(conv.messages())
        if engine.count_tokens(prompt) + want <= engine.info.n_ctx or not conv.drop_oldest_exchange():
            return prompt
        notify("the conversation outgrew the context: dropped the oldest exchange")


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
