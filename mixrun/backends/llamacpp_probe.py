"""The child process of :mod:`mixrun.backends.llamacpp_cpu`: load a quantized GGUF with llama.cpp and decode a batch.

``python -m mixrun.backends.llamacpp_probe MODEL [--no-extra-bufts]``. It prints a JSON line with llama.cpp's
system info before anything that could crash, one with the CPU's extra buffer types, loads the model on the CPU with llama.cpp's log on stderr (its
``... model buffer size`` lines tell the parent which buffer types took the weights), evaluates a batch of 8 tokens
(the path that dies on some AMX hosts: a 1-token step does not reach it) and one more token, then prints ``ok``.
A crash here is a signal the parent reads; nothing in this file tries to survive one.
"""

from __future__ import annotations

import json
import sys

BATCH = 8


def main(argv: list[str]) -> int:
    model, extra = argv[0], "--no-extra-bufts" not in argv[1:]
    import llama_cpp

    print(json.dumps({"system_info": llama_cpp.llama_print_system_info().decode(errors="replace")}), flush=True)
    from mixrun.backends.ggml import cpu_extra_buffer_types

    print(json.dumps({"extra_buffer_types": cpu_extra_buffer_types(llama_cpp)}), flush=True)
    low = llama_cpp.llama_cpp
    original = low.llama_model_default_params

    def params() -> object:
        p = original()
        p.use_extra_bufts = extra
        return p

    low.llama_model_default_params = params
    llm = llama_cpp.Llama(model_path=model, n_ctx=64, n_batch=BATCH, n_gpu_layers=0, verbose=True)
    tokens = llm.tokenize(b"The quick brown fox jumps over the lazy dog.", add_bos=True)[:BATCH]
    llm.eval(tokens)
    llm.eval(tokens[:1])
    print("ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
