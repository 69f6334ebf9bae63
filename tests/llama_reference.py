"""llama.cpp as the reference the torch backend's tests compare with (logits and greedy tokens)."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np

from mixrun.backends.llamacpp_cpu import finding
from mixrun.backends.llamacpp_load import llama_params


def load(path: str | Path, n_ctx: int = 256) -> llama_cpp.Llama:
    """An F32 KV cache, so the reference stores what the torch backend stores; repacked weights as mixrun loads
    them."""
    with llama_params(llama_cpp, extra_buffers=finding().extra_buffers):
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2,
                               type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def reference(path: str | Path, toks: list[int], n_tokens: int, n_ctx: int) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits for ``toks`` and its first ``n_tokens`` greedy tokens after them."""
    ref = load(path, n_ctx)
    try:
        ref.eval(toks)
        logits = np.array(ref.scores[: len(toks)])
        ref.reset()
        tokens: list[int] = []
        for t in ref.generate(toks, temp=0.0, top_k=1, repeat_penalty=1.0):
            tokens.append(t)
            if len(tokens) == n_tokens:
                break
    finally:
        ref.close()
    return logits, tokens
