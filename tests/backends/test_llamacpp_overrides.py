"""Tensor overrides and device lists through llama-cpp-python: specs, names and the struct layout are checked before
anything loads, and the real llama.cpp on this CPU places tensors the way its own load report and debug log say.

The real loads capture llama.cpp's log in-process (``llama_log_set``) and read its ``... model buffer size`` lines
and its ``tensor NAME (...) buffer type overridden to BUFT`` debug lines.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

import gguf_factory
from mixrun.backends import llamacpp_overrides as ov
from mixrun.backends.llamacpp_load import llama_params
from mixrun.errors import MixrunError

MIB = 1024 * 1024
_BUFFER = re.compile(r"(\S+) model buffer size =\s*([\d.]+) MiB")
_OVERRIDDEN = re.compile(r"tensor (\S+) \(.*\) buffer type overridden to (\S+)")


def one_line(e: pytest.ExceptionInfo[MixrunError]) -> str:
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# ---- specs and rendering (pure) -------------------------------------------------------------------------------


def test_specs_parse_in_llama_servers_syntax_and_render_as_its_arguments() -> None:
    specs = [r"blk\.0\.=CPU", r"ffn_.*_exps=CUDA1"]
    parsed = ov.parse_overrides(specs)
    assert parsed == (ov.TensorOverride(r"blk\.0\.", "CPU"), ov.TensorOverride("ffn_.*_exps", "CUDA1"))
    assert ov.server_args(specs, ["CUDA0", "CUDA2"]) == ["-ot", r"blk\.0\.=CPU", "-ot", "ffn_.*_exps=CUDA1",
                                                         "--device", "CUDA0,CUDA2"]
    assert ov.server_flags(specs[:1]) == r"-ot 'blk\.0\.=CPU'"
    assert ov.server_args(devices=[]) == ["--device", "none"]  # llama-server's spelling of "no offload device"
    assert ov.server_args() == []  # nothing given: llama.cpp's defaults, nothing to say
    assert ov.parse_devices(["none"]) == () and ov.parse_devices("CUDA0,CUDA1") == ("CUDA0", "CUDA1")
    assert ov.parse_devices(None) is None
    assert ov.parse_overrides(r"blk\.0\.=CPU") == parsed[:1]  # one string is one spec


@pytest.mark.parametrize(("spec", "problem"), [
    ("blk.(0=CPU", "not a regular expression"),
    ("blk.0.", 'expected "REGEX=BUFFER"'),
    ("=CPU", 'expected "REGEX=BUFFER"'),
    ("blk.0.=", 'expected "REGEX=BUFFER"'),
    (r"blk\.(0|1){1,2}=CPU", "splits -ot values at commas"),
])
def test_a_bad_spec_is_one_line_naming_it(spec: str, problem: str) -> None:
    with pytest.raises(MixrunError) as e:
        ov.parse_overrides(["ok=CPU", spec])
    assert problem in one_line(e) and repr(spec) in str(e.value)


def test_bad_device_lists() -> None:
    for names, problem in ((["CUDA0", "cuda0"], "listed twice"), (["CUDA0", ""], "device name"),
                           (["CUDA0", "none"], "device name")):
        with pytest.raises(MixrunError) as e:
            ov.parse_devices(names)
        assert problem in one_line(e)


# ---- names against this llama.cpp -----------------------------------------------------------------------------


def test_buffer_types_are_found_by_name_extra_ones_included() -> None:
    import llama_cpp

    from mixrun.backends.ggml import cpu_extra_buffer_types

    known = ov.buffer_types(llama_cpp)
    assert "CPU" in known and all(known.values())
    assert set(cpu_extra_buffer_types(llama_cpp) or []) <= set(known)  # CPU_REPACK/AMX where the build has them


def test_an_unknown_buffer_type_lists_the_known_ones() -> None:
    import llama_cpp

    with pytest.raises(MixrunError) as e:
        ov.placement(llama_cpp, [r"blk\.0\.=CPU", r"blk\.1\.=CUDA7"])
    text = one_line(e)
    assert r"'blk\\.1\\.=CUDA7'" in text and "unknown buffer type CUDA7" in text and "CPU" in text


def test_an_unknown_device_lists_the_available_ones() -> None:
    import llama_cpp

    from mixrun.backends.ggml import devices

    gpus = [d.name for d in devices(llama_cpp) or [] if d.kind != "CPU"]
    with pytest.raises(MixrunError) as e:
        ov.placement(llama_cpp, devices=["CUDA9"])
    text = one_line(e)
    assert "--device CUDA9: unknown device" in text
    assert all(g in text for g in gpus) if gpus else "no GPU devices" in text
    with pytest.raises(MixrunError, match="the CPU is not an offload device"):  # llama-server: "invalid device"
        ov.placement(llama_cpp, devices=["cpu"])


# ---- the binding's struct -------------------------------------------------------------------------------------


def fake_binding(monkeypatch: pytest.MonkeyPatch, fields: list[tuple[str, object]]) -> object:
    import llama_cpp

    params = type("llama_model_params", (ctypes.Structure,), {"_fields_": fields})
    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_params", params)
    monkeypatch.setattr(llama_cpp, "__version__", "9.9.9")
    return llama_cpp


@pytest.mark.parametrize(("change", "problem"), [
    (lambda f: [f[1], f[0], *f[2:]], "field 0 is tensor_buft_overrides, not devices"),
    (lambda f: [f[0], ("tensor_buft_overrides", ctypes.POINTER(ov.TensorBuftOverride)), *f[2:]],
     "tensor_buft_overrides declared as LP_TensorBuftOverride"),
    (lambda f: [*f[:-1], ("load_mtp", ctypes.c_int64)], "bytes, not 80"),
    (lambda f: [*f, ("something_new", ctypes.c_int)], "an extra field something_new"),
    (lambda f: f[:-1], "no field 16 (load_mtp)"),
])
def test_a_binding_with_another_layout_is_refused(monkeypatch: pytest.MonkeyPatch, change: object,
                                                  problem: str) -> None:
    llama_cpp = fake_binding(monkeypatch, change(list(ov._ExpectedParams._fields_)))  # type: ignore[operator]
    with pytest.raises(MixrunError) as e:
        ov.placement(llama_cpp, [r"blk\.0\.=CPU"])
    text = one_line(e)
    assert problem in text and "llama-cpp-python 9.9.9" in text and ov.BUILT_AGAINST in text
    # nothing asked for: nothing written, nothing refused (the engine's old path)
    with llama_params(llama_cpp) as placed:
        assert placed.override_array is None and placed.device_array is None


def test_the_installed_binding_has_the_layout_written_into() -> None:
    import llama_cpp

    ov.check_layout(llama_cpp)
    assert ctypes.sizeof(llama_cpp.llama_cpp.llama_model_params) == ctypes.sizeof(ov._ExpectedParams)


# ---- the holder -----------------------------------------------------------------------------------------------


def test_the_placement_owns_null_terminated_arrays_that_outlive_the_specs() -> None:
    import llama_cpp

    placed = ov.placement(llama_cpp, [f"blk\\.{i}\\.=CPU" for i in range(3)], devices=[])
    gc.collect()
    arr = placed.override_array
    assert arr is not None and len(arr) == 4
    assert [arr[i].pattern for i in range(3)] == [b"blk\\.0\\.", b"blk\\.1\\.", b"blk\\.2\\."]
    assert arr[3].pattern is None and not arr[3].buft  # the {NULL, NULL} terminator
    assert arr[0].buft == ov.buffer_types(llama_cpp)["CPU"]
    assert placed.patterns == [arr[i].pattern for i in range(3)]  # the bytes the pointers point into, held here
    assert placed.device_array is not None and list(placed.device_array) == [None]  # "--device none"
    params = llama_cpp.llama_model_default_params()
    placed.apply(params)
    assert params.tensor_buft_overrides == ctypes.addressof(arr)
    assert params.devices == ctypes.addressof(placed.device_array)
    assert placed.server_args() == ["-ot", r"blk\.0\.=CPU", "-ot", r"blk\.1\.=CPU", "-ot", r"blk\.2\.=CPU",
                                    "--device", "none"]
    untouched = llama_cpp.llama_model_default_params()
    ov.placement(llama_cpp).apply(untouched)
    assert untouched.tensor_buft_overrides is None and untouched.devices is None


# ---- the real llama.cpp on this CPU ---------------------------------------------------------------------------


@contextlib.contextmanager
def llama_log() -> Iterator[list[str]]:
    """Everything llama.cpp logs (debug level included) while the block runs; llama-cpp-python's own callback is
    put back afterwards."""
    import llama_cpp
    import llama_cpp._logger

    chunks: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: object) -> None:
        chunks.append(text.decode(errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield chunks
    finally:
        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))


def load(model: str | Path, *, extra: bool, overrides: list[str] | None = None,
         answer: bool = False) -> tuple[dict[str, float], dict[str, str], str | None]:
    """Load on the CPU; llama.cpp's model buffers (MiB), the tensors it says it overrode (name -> buffer type), and
    three greedy tokens' text when asked."""
    import llama_cpp

    with llama_log() as chunks:
        with llama_params(llama_cpp, extra_buffers=extra, overrides=overrides) as placed:
            llm = llama_cpp.Llama(model_path=str(model), n_ctx=64, n_threads=2, verbose=False)
        try:
            text = llm.create_completion([1, 2, 3, 4, 5], max_tokens=3, temperature=0)["choices"][0]["text"] \
                if answer else None
        finally:
            llm.close()
        del placed  # held until the model is gone
    log = "".join(chunks)
    return ({b: float(mib) for b, mib in _BUFFER.findall(log)}, dict(_OVERRIDDEN.findall(log)), text)


@pytest.fixture(scope="module")
def q4_0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Q4_0 model: every matrix is one CPU_REPACK takes on x86 (rows a multiple of 8)."""
    return gguf_factory.write_model(tmp_path_factory.mktemp("ot") / "q4_0.gguf", n_embd=256, n_ff=512, n_head=4,
                                    n_head_kv=4, qtype="Q4_0", merges=True)


def repack_host() -> None:
    import llama_cpp

    from mixrun.backends.ggml import cpu_extra_buffer_types

    if "CPU_REPACK" not in (cpu_extra_buffer_types(llama_cpp) or []):
        pytest.skip("this llama.cpp build has no CPU_REPACK buffer type")


def test_an_override_to_an_extra_buffer_type_moves_exactly_those_weights(q4_0: Path) -> None:
    """With repacking off nothing is in CPU_REPACK; ``blk.0.ffn_*=CPU_REPACK`` puts layer 0's three FFN matrices
    there (llama.cpp's report grows by exactly their bytes) and the model still answers the same."""
    import gguf

    repack_host()
    plain, none, text = load(q4_0, extra=False, answer=True)
    assert "CPU_REPACK" not in plain and none == {}
    spec = r"blk\.0\.ffn_(up|gate|down)\.=CPU_REPACK"
    bufs, moved, text_ot = load(q4_0, extra=False, overrides=[spec], answer=True)
    assert moved == {f"blk.0.ffn_{n}.weight": "CPU_REPACK" for n in ("gate", "down", "up")}
    ffn_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(q4_0).tensors if t.name in moved)
    assert bufs["CPU_REPACK"] == round(ffn_bytes / MIB, 2)
    assert text_ot == text and text


def test_an_override_to_cpu_still_lets_llama_cpp_choose_the_extra_buffer(q4_0: Path) -> None:
    """llama.cpp's rule (PR #14990): an override to ``CPU`` re-selects among the CPU's buffer types, extra ones
    first, so on a repacking host ``blk.0.=CPU`` reaches llama.cpp (its log names every layer-0 tensor) and leaves
    the buffer report as it was. Loading only: the batched path some AMX hosts crash on is never reached."""
    repack_host()
    default, none, _ = load(q4_0, extra=True)
    assert default.get("CPU_REPACK", 0) > 0 and none == {}
    bufs, moved, _ = load(q4_0, extra=True, overrides=[r"blk\.0\.=CPU"])
    assert bufs == default
    assert set(moved) == {f"blk.0.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                        "ffn_norm", "ffn_gate", "ffn_down", "ffn_up")}
    assert moved["blk.0.ffn_up.weight"] == "CPU_REPACK" and moved["blk.0.attn_norm.weight"] == "CPU"


def test_the_engine_takes_them_from_the_plan_and_keeps_them(smollm2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundled model through :class:`LlamaCppEngine`: the plan's ``override_tensor`` and ``devices`` reach
    llama.cpp's model params (not ``Llama()``'s keyword arguments), llama.cpp overrides layer 0 and nothing else,
    and the greedy answer is the one without them."""
    import llama_cpp

    from mixrun.backends import llamacpp
    from mixrun.backends.base import Sampling, Stats
    from mixrun.backends.llamacpp_cpu import CpuFinding
    from mixrun.vocab import Backend, Split

    monkeypatch.setattr(llamacpp, "finding", lambda: CpuFinding(extra_buffers=True))
    seen: list[tuple[int | None, int | None]] = []
    real_load = llama_cpp.llama_cpp.llama_model_load_from_file

    def recording_load(path: bytes, params: object) -> object:
        seen.append((params.tensor_buft_overrides, params.devices))  # type: ignore[attr-defined]
        return real_load(path, params)

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_load_from_file", recording_load)

    def answer(engine: llamacpp.LlamaCppEngine) -> str:
        prompt = engine.template.render([{"role": "user", "content": "What is the capital of France?"}])
        return "".join(engine.generate(prompt, Sampling(temperature=0, max_tokens=3), Stats()))

    plain = llamacpp.LlamaCppEngine(smollm2, n_ctx=256, n_threads=2, show_progress=False)
    try:
        expected = answer(plain)
    finally:
        plain.close()
    assert seen == [(None, None)] and plain.placement.override_array is None  # unchanged without them

    plan = SimpleNamespace(split=Split.LAYER, backend=Backend.LLAMACPP, decode_tok_s=1.0, prefill_tok_s=1.0,
                           llama_kwargs={"n_ctx": 256, "override_tensor": [r"blk\.0\.=CPU"], "devices": []})
    with llama_log() as chunks:
        engine = llamacpp.LlamaCppEngine(smollm2, n_ctx=256, n_threads=2, plan=plan,  # type: ignore[arg-type]
                                         show_progress=False)
    try:
        placed = engine.placement
        assert seen[-1] == (ctypes.addressof(placed.override_array), ctypes.addressof(placed.device_array))
        moved = dict(_OVERRIDDEN.findall("".join(chunks)))
        assert moved and all(name.startswith("blk.0.") for name in moved) and len(moved) == 9
        gc.collect()
        assert placed.override_array[0].pattern == rb"blk\.0\." and answer(engine) == expected
        assert placed.server_args() == ["-ot", r"blk\.0\.=CPU", "--device", "none"]
    finally:
        engine.close()
    # the engine's own kwargs carry the same keys; a bad one is one line before anything loads
    with pytest.raises(MixrunError) as e:
        llamacpp.LlamaCppEngine(smollm2, n_ctx=256, kwargs={"override_tensor": ["blk.0.=GPU9"]}, show_progress=False)
    assert "unknown buffer type GPU9" in one_line(e) and len(seen) == 2
