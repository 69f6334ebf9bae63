"""The fused Triton kernels compiled ahead of time for NVIDIA GPUs, without one: every variant must compile, and
ptxas must fit it in registers without spilling.

``test_torch_kernels`` runs the kernels in Triton's interpreter, which executes them with numpy and so accepts
code that the compiler rejects (``tl.static_range`` over a runtime bound, say) or that needs more registers than
a thread has. Here each variant goes through ``triton.compile`` for a ``GPUTarget``: the frontend, the backend's
passes and the ptxas triton ships, none of which needs a driver. That runs in child processes, this file run as a
script, because the interpreter tests set TRITON_INTERPRET for the whole pytest process and a kernel decorated
under it cannot be compiled.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mixrun  # only for where it lives: the children must compile this checkout's kernels

ARCHS = (90, 80)  # H100, A100
# A quant type's code is a constexpr branch that is compiled only for that type, so every type is compiled at one
# activation row. Registers grow with the rows (the loop over them is unrolled), so these are also compiled at
# MAX_ROWS: Q4_K and Q6_K (Q4_K_M's types), Q5_K and Q3_K (fifth and high bits), Q8_0 (sign-extended codes), and
# Q4_1, whose "+ m" sends the weights through shared memory.
WIDE_TYPES = ("Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q8_0", "Q4_1")
COLS = 4096  # the matrix's width and height: a 7-8B model's hidden size
MAX_REGISTERS = 255  # per thread, on every GPU triton compiles for
_PTR_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "uint8": "u8"}  # torch's name -> triton's


def _launch(kernels, qtype, rows: int) -> tuple[list, dict]:
    """The arguments and keywords ``matvec`` launches the kernel with, for bfloat16 activations (meta tensors)."""
    import torch
    from gguf import GGML_QUANT_SIZES

    block_size, type_size = GGML_QUANT_SIZES[qtype]
    x = torch.empty((rows, COLS), dtype=torch.bfloat16, device="meta")
    raw = torch.empty((COLS, COLS // block_size * type_size), dtype=torch.uint8, device="meta")
    seen: list[tuple[tuple, dict]] = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append((args, kwargs))

    kernel, kernels._matvec_kernel = kernels._matvec_kernel, Recorder()
    try:
        kernels.matvec(x, raw, qtype, COLS)
    finally:
        kernels._matvec_kernel = kernel
    (args, kwargs), = seen
    return list(args), kwargs


def _source(triton, fn, args: list, kwargs: dict):
    """The ``ASTSource`` a launch with these arguments compiles: ints equal to 1 become constexprs like the declared
    ones, and pointers (torch allocates at 512-byte boundaries) and ints divisible by 16 get that hint."""
    values = dict(zip(fn.arg_names, args, strict=False)) | kwargs  # matvec passes K on as a keyword
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name, value = param.name, values[param.name]
        if hasattr(value, "dtype"):
            signature[name] = "*" + _PTR_TYPES[str(value.dtype).removeprefix("torch.")]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif param.is_constexpr or value == 1:
            signature[name] = "constexpr"
            constexprs[name] = value
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def compile_variants(arch: int) -> list[dict]:
    """Compile every variant for sm_<arch>; each result has the variant's name and either ptxas's register and
    spill counts or the compiler's error. Needs TRITON_DUMP_PTXAS_LOG=1 and an empty TRITON_CACHE_DIR, so that
    ptxas runs and prints its report."""
    import triton
    from gguf import GGMLQuantizationType
    from triton.backends.compiler import GPUTarget

    from mixrun.backends.torch import kernels

    target = GPUTarget("cuda", arch, 32)
    variants = [(t, 1) for t in sorted(kernels.SUPPORTED, key=lambda t: t.name)]
    variants += [(GGMLQuantizationType[name], kernels.MAX_ROWS) for name in WIDE_TYPES]
    results = []
    for qtype, rows in variants:
        result: dict = {"variant": f"sm_{arch} {qtype.name} bf16 M={rows}"}
        log = io.StringIO()
        try:
            args, kwargs = _launch(kernels, qtype, rows)
            options = {"num_warps": kwargs.pop("num_warps")}
            with contextlib.redirect_stdout(log):  # where triton prints ptxas's report
                triton.compile(_source(triton, kernels._matvec_kernel, args, kwargs), target=target,
                               options=options)
        except Exception as e:  # the compiler's message (with the kernel's source line) and what it printed
            result["error"] = "".join(traceback.format_exception_only(e)) + log.getvalue()
            results.append(result)
            continue
        regs = re.search(r"Used (\d+) registers", log.getvalue())
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
        if regs is None or spills is None:
            result["error"] = f"no register report from ptxas in:\n{log.getvalue()}"
        else:
            result["registers"] = int(regs.group(1))
            result["spill_bytes"] = int(spills.group(1)) + int(spills.group(2))
        results.append(result)
    return results


def _compile_in_child(arch: int, cache: Path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache)  # empty: a cached kernel would skip ptxas and its report
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(mixrun.__file__).parents[1]), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__, str(arch)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0 and proc.stdout, f"sm_{arch}: the compiling process failed:\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.splitlines()[-1])


def test_kernels_compile_for_gpus_without_spills(tmp_path):
    with ThreadPoolExecutor(len(ARCHS)) as pool:  # one process per target: compiling is single-threaded
        per_arch = list(pool.map(lambda arch: _compile_in_child(arch, tmp_path / f"sm_{arch}"), ARCHS))
    assert all(len(results) > len(WIDE_TYPES) for results in per_arch)
    failures = []
    for r in (r for results in per_arch for r in results):
        if "error" in r:
            failures.append(f"{r['variant']} did not compile:\n{r['error']}")
        elif r["spill_bytes"] or r["registers"] > MAX_REGISTERS:
            failures.append(f"{r['variant']}: {r['registers']} registers, {r['spill_bytes']} bytes of spills")
    assert not failures, "\n\n".join(failures)


if __name__ == "__main__":
    print(json.dumps(compile_variants(int(sys.argv[1]))))
