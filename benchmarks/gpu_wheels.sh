#!/usr/bin/env bash
# Wheels for a lent GPU machine (the `device` tool's nvidia-h100-x1 / nvidia-h200): Python 3.12 with torch, triton,
# numpy, jinja2, rich, psutil and nvidia-ml-py already there, and no network. This puts what else mixrun's torch
# backend imports into .whl/ (in .gitignore, carried by the call): gguf, pydantic and its parts, tomli-w,
# platformdirs, typing-extensions, and llama-cpp-python, whose wheel is Python-independent (ctypes over libllama)
# and comes from pip's cache of the one built by the README's install; and mixrun itself, built from this checkout
# (run this again after a change). The bundled SmolLM2 (94 MB) does not fit the
# 64 MiB a call carries; torch_gpu_roofline.py writes a small model in its place.
#
#   bash benchmarks/gpu_wheels.sh
#   then, as one device call with carry [".whl"]:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#     && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
#     && python3 benchmarks/torch_gpu_kernels.py && python3 benchmarks/torch_gpu_roofline.py
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "gguf==$(python3 -c 'import importlib.metadata as m; print(m.version("gguf"))')" \
    pydantic pydantic-core annotated-types typing-inspection typing-extensions tomli-w platformdirs diskcache
python3 -m pip wheel -q --no-deps -w .whl \
    "llama-cpp-python==$(python3 -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"
python3 -m pip wheel -q --no-deps -w .whl .
du -sh .whl
