"""The memory model against llama.cpp's own buffer report, saved by benchmarks/llamacpp_memory.py."""

from __future__ import annotations

import json
from pathlib import Path

from mixrun.gguf_spec import read_spec
from mixrun.planner.memory import ModelFacts, compute_bytes

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "llamacpp_memory_results.json"


def test_smollm2_kv_and_compute_match_llamacpp(smollm2: str) -> None:
    spec = read_spec(smollm2)
    rows = [r for r in json.loads(RESULTS.read_text())["rows"]
            if r["model"] == "smollm2" and r.get("result") and not r.get("no_alloc")]
    assert len(rows) >= 9
    for r in rows:
        res = r["result"]
        facts = ModelFacts(spec, r["type_k"])
        kv = facts.kv_bytes(r["n_ctx"], r["n_ubatch"], 0, spec.n_layers)
        assert kv == (res.get("exact_context") or res["kv"]), r  # exact, padding to 256 cells included
        comp = compute_bytes(spec, ctx=r["n_ctx"], ubatch=r["n_ubatch"], n_layers=spec.n_layers, last=True,
                             flash_attn=r["flash_attn"])
        measured = res.get("exact_compute") or res["compute"]
        assert abs(comp - measured) <= 0.10 * measured, (r["n_ctx"], r["n_ubatch"], r["flash_attn"], comp, measured)
        assert spec.total_bytes == res["model_size"]  # the weights llama.cpp counts
