"""The llama.cpp backend, through llama-cpp-python: load a GGUF and stream tokens.

A plan's ``llama_kwargs`` may carry ``"override_tensor"`` (``"REGEX=BUFFER"`` strings, llama-server's ``-ot``) and
``"devices"`` (llama.cpp device names, llama-server's ``--device``): ``Llama()`` takes neither, so they go into the
model parameters through :func:`mixrun.backends.llamacpp_load.llama_params`.

Prompts are rendered by :mod:`mixrun.chat` (the sandboxed template, the same for every backend) and tokenized by
llama.cpp itself. Generation reuses the KV cache for the prompt prefix the previous turn left (llama-cpp-python's
``generate`` matches the prefix), so a follow-up question only prefills the new turn.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from mixrun.backends.base import EngineInfo, Sampling, Stats
from mixrun.backends.llamacpp_cpu import finding
from mixrun.backends.llamacpp_load import LoadProgress, interruptible, llama_params
from mixrun.backends.text import Vocab, stream_text, without_chat_handlers
from mixrun.errors import GGUFError, MixrunError, where
from mixrun.rig.probe import cuda_order_env
from mixrun.rig.sampler import DeviceSampler
from mixrun.telemetry import Snapshot, now
from mixrun.vocab import Backend, Split

if TYPE_CHECKING:
    from mixrun.planner.types import Candidate

PLACEMENT_KEYS = ("override_tensor", "devices")  # llama_kwargs keys that are model params, not Llama() arguments
SPLIT_MODES = {Split.NONE: "LLAMA_SPLIT_MODE_NONE", Split.LAYER: "LLAMA_SPLIT_MODE_LAYER",
               Split.ROW: "LLAMA_SPLIT_MODE_ROW", Split.TENSOR: "LLAMA_SPLIT_MODE_TENSOR"}


def llama_kwargs(plan: Candidate, llama_cpp: Any) -> dict[str, Any]:
    """A planned llama.cpp candidate -> ``llama_cpp.Llama(...)`` keyword arguments (``n_ctx`` aside).

    The planner (pure) computes the numbers; this maps the split to the binding's constant, and refuses a split
    mode the installed llama.cpp does not have.
    """
    kwargs = {k: v for k, v in plan.llama_kwargs.items() if k != "n_ctx"}
    split = plan.split
    if split not in SPLIT_MODES or plan.backend != Backend.LLAMACPP:
        raise MixrunError(f"--split {split}: a {plan.backend} plan does not run on llama.cpp")
    const = SPLIT_MODES[split]
    if "split_mode" in kwargs:
        if not hasattr(llama_cpp, const):
            raise MixrunError(f"--split {split}: this llama.cpp build has no {split} split mode")
        kwargs["split_mode"] = getattr(llama_cpp, const)
    return kwargs


class LlamaCppEngine:
    def __init__(self, model: str, n_ctx: int = 4096, n_threads: int | None = None, seed: int | None = None,
                 plan: Candidate | None = None, kwargs: dict[str, Any] | None = None,
                 progress: LoadProgress | None = None, show_progress: bool = True) -> None:
        cpu = finding()  # probes llama.cpp on this CPU in a child process, once per machine
        cpu.require_usable()
        cuda_order_env()  # CUDA numbers GPUs by PCI bus, as the profile does
        import llama_cpp

        self._llama_cpp = llama_cpp
        if not os.path.isfile(model):
            raise GGUFError(where(model, "no such file"))
        kwargs = {**(llama_kwargs(plan, llama_cpp) if plan is not None else {}), **(kwargs or {})}
        overrides, devices = (kwargs.pop(k, None) for k in PLACEMENT_KEYS)
        progress = progress or LoadProgress(os.path.basename(model), out=None if show_progress else io.StringIO())
        try:
            with interruptible(progress), \
                    llama_params(llama_cpp, progress, extra_buffers=cpu.extra_buffers, overrides=overrides,
                                 devices=devices) as placed, \
                    without_chat_handlers(llama_cpp):
                # llama.cpp points into these arrays for the model's life (llama_model::params)
                self.placement = placed
                self.llm = llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_threads=n_threads,
                                           seed=seed if seed is not None else llama_cpp.LLAMA_DEFAULT_SEED,
                                           verbose=False, **kwargs)
        except ValueError as e:  # llama-cpp-python raises ValueError("Failed to load model from file: ...")
            if progress.interrupted:
                raise KeyboardInterrupt from None
            raise GGUFError(where(model, f"llama.cpp could not load it ({e})")) from None
        notes = [cpu.note] if cpu.note else []
        if not llama_cpp.llama_supports_gpu_offload():
            notes.append("llama.cpp was built without GPU support: running on the CPU")
        self.info = EngineInfo(backend="llama.cpp", model=model, n_ctx=self.llm.n_ctx(), notes=notes, plan=plan)
        self._tokens_total = 0
        self._last = Stats()
        self._sampler: DeviceSampler | None = None
        try:
            self.vocab = Vocab(self.llm, model)  # compiles the chat template: TemplateError if it is unusable
        except BaseException:
            self.close()
            raise
        self.template = self.vocab.template

    def tokenize(self, text: str) -> list[int]:
        return self.vocab.tokenize(text)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def generate(self, prompt: str, sampling: Sampling, stats: Stats) -> Iterator[str]:
        tokens = self.vocab.prompt_tokens(prompt)  # llama-cpp-python asserts on an empty prompt
        stats.prompt_tokens = len(tokens)
        room = self.info.n_ctx - len(tokens)
        if room <= 0:
            stats.stop_reason = "context full"
            return
        # Llama.generate seeds a new sampler chain with llm._seed on every call; LLAMA_DEFAULT_SEED draws a random seed
        # there. Set it every time, or a seedless answer would replay the last seeded one: seed None is random on both
        # backends (mixrun.backends.torch.sampling.resolve_seed)
        self.llm.set_seed(sampling.seed if sampling.seed is not None else self._llama_cpp.LLAMA_DEFAULT_SEED)
        ids = self.llm.generate(tokens, top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p,
                                temp=sampling.temperature, repeat_penalty=sampling.repeat_penalty)
        try:
            yield from stream_text(ids, self.vocab, sampling, stats, min(sampling.max_tokens, room))
        finally:
            self._tokens_total += stats.completion_tokens
            self._last = stats

    def telemetry(self) -> Snapshot:
        """Tokens and rates of the last answer, and this process's memory and CPU (llama.cpp exposes no
        per-device counters through the binding)."""
        if self._sampler is None:
            self._sampler = DeviceSampler(pids={"cpu": [os.getpid()]})
        plan, last = self.info.plan, self._last
        return Snapshot(t=now(), backend="llama.cpp", tokens_total=self._tokens_total,
                        decode_tok_s=last.decode_tok_s or None, prefill_tok_s=last.prefill_tok_s or None,
                        predicted_decode_tok_s=plan.decode_tok_s if plan else None,
                        predicted_prefill_tok_s=plan.prefill_tok_s if plan else None,
                        devices=self._sampler.sample())

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()

