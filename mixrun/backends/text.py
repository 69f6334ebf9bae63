"""Tokens <-> text for every backend, through llama.cpp's own tokenizer (a full or a vocab-only ``Llama``).

:class:`Vocab` tokenizes prompts the way llama.cpp does (BOS when the file asks for it, special tokens parsed) and
knows the end-of-generation tokens; :class:`TextStream` turns generated tokens into text pieces: UTF-8 decoded
incrementally (a character split over tokens is held back) and cut at stop strings (the longest stop string is held
back so a stop spanning tokens is never shown).
"""

from __future__ import annotations

import codecs
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from mixrun.backends.template import ChatTemplate, context_chars
from mixrun.errors import GGUFError, where

_HANDLERS_LOCK = threading.Lock()


class _UnusedChatFormatter:
    """Stands in for llama-cpp-python's ``Jinja2ChatFormatter`` while a model loads.

    ``Llama.__init__`` compiles every ``tokenizer.chat_template*`` of the file with plain Jinja2, unbounded, so an
    untrusted template that does not parse raises ``TemplateSyntaxError`` out of the load. mixrun never calls
    ``create_chat_completion``: it renders with :class:`ChatTemplate`, which reports such a template in one line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def to_chat_handler(self) -> Any:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("mixrun renders chat templates itself (mixrun.backends.template)")

        return refuse


@contextlib.contextmanager
def without_chat_handlers(llama_cpp: Any) -> Iterator[None]:
    """Build ``llama_cpp.Llama`` objects inside this: their chat handlers are not compiled (see
    :class:`_UnusedChatFormatter`). Loads in other threads wait, so the swap is never undone under one of them."""
    from llama_cpp import llama_chat_format

    with _HANDLERS_LOCK:
        real = llama_chat_format.Jinja2ChatFormatter
        llama_chat_format.Jinja2ChatFormatter = _UnusedChatFormatter
        try:
            yield
        finally:
            llama_chat_format.Jinja2ChatFormatter = real


class Vocab:
    def __init__(self, llm: Any, model: str) -> None:
        import llama_cpp

        self.llm = llm
        self.model = model
        self._vocab = llm._model.vocab
        self._is_eog = llama_cpp.llama_vocab_is_eog
        bos, eos = self.piece(llm.token_bos()), self.piece(llm.token_eos())
        # a render the context cannot hold is refused before the tokenizer sees it (see context_chars)
        self.template = ChatTemplate(llm.metadata.get("tokenizer.chat_template"), model, bos, eos,
                                     max_chars=context_chars(llm.n_ctx() or 4096))
        self._add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
        self._bos_text = bos

    def piece(self, token: int) -> str:
        if token < 0:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def tokenize(self, text: str) -> list[int]:
        add_bos = self._add_bos and not (self._bos_text and text.startswith(self._bos_text))
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def prompt_tokens(self, text: str) -> list[int]:
        """A prompt's tokens; a prompt that is no tokens at all is refused in one line (both backends need one to
        give logits: llama-cpp-python asserts, the torch ranks would run an empty step)."""
        tokens = self.tokenize(text)
        if not tokens:
            raise GGUFError(where(self.model, "the prompt is no tokens at all in this model's vocabulary"))
        return tokens

    def is_eog(self, token: int) -> bool:
        return bool(self._is_eog(self._vocab, token))

    def eog_ids(self) -> list[int]:
        return [t for t in range(self.llm.n_vocab()) if self.is_eog(t)]

    def bytes_of(self, token: int) -> bytes:
        return self.llm.detokenize([token])


class TextStream:
    """Feed tokens' bytes, get the text that is safe to show; ``stopped`` once a stop string was met."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=0)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, data: bytes) -> str:
        self.text += self._decoder.decode(data)
        cut = min((i for i in (self.text.find(s, max(self.emitted - self.hold, 0)) for s in self.stop) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.stopped = True
            return self._take(len(self.text))
        return self._take(len(self.text) - self.hold)

    def finish(self) -> str:
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted:upto], upto
        return piece


def stream_text(tokens: Iterator[int], vocab: Vocab, sampling: Any, stats: Any, limit: int) -> Iterator[str]:
    """Text pieces of generated ``tokens`` for every backend: times the first token (prefill) and the rest
    (decode), stops at an end-of-generation token, a stop string, or ``limit`` tokens, and fills ``stats``."""
    stream = TextStream(sampling.stop)
    stats.stop_reason = "length"
    t0 = time.perf_counter()
    t_first = None
    for tok in tokens:
        now = time.perf_counter()
        if t_first is None:
            t_first = now
            stats.prefill_s = now - t0
        else:
            stats.decode_s = now - t_first
        if vocab.is_eog(tok):
            stats.stop_reason = "eos"
            break
        stats.completion_tokens += 1
        piece = stream.feed(vocab.bytes_of(tok))
        if piece:
            yield piece
        if stream.stopped:
            stats.stop_reason = "stop"
            break
        if stats.completion_tokens >= limit:
            stats.stop_reason = "length" if stats.completion_tokens >= sampling.max_tokens else "context full"
            break
    tail = stream.finish()
    if tail:
        yield tail
