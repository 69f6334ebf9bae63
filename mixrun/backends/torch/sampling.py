"""Next-token sampling on full logits, in llama.cpp's order: repeat penalty, top-k, top-p, min-p, temperature.

``temperature <= 0`` is greedy (argmax), so greedy runs are deterministic and comparable across backends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

PENALTY_LAST_N = 64  # llama.cpp's default window for the repeat penalty


def sample(logits: torch.Tensor, s: dict[str, Any], recent: Sequence[int], gen: torch.Generator) -> int:
    """One token from ``logits`` (vocab,) under the settings ``s`` (keys as in :class:`~mixrun.backends.base.Sampling`)."""
    penalty = float(s.get("repeat_penalty", 1.0))
    temp = float(s.get("temperature", 0.0))
    if temp <= 0 and (penalty == 1.0 or not recent):
        return int(torch.argmax(logits))  # nothing to change in the logits: no copy
    logits = logits.float().clone()
    if penalty != 1.0 and recent:
        ids = torch.tensor(sorted(set(recent[-PENALTY_LAST_N:])), dtype=torch.long)
        vals = logits[ids]
        logits[ids] = torch.where(vals > 0, vals / penalty, vals * penalty)
    if temp <= 0:
        return int(torch.argmax(logits))
    k = int(s.get("top_k", 0))
    if 0 < k < logits.numel():
        kth = torch.topk(logits, k).values[-1]
        logits[logits < kth] = -float("inf")
    probs = torch.softmax(logits, dim=-1)
    top_p = float(s.get("top_p", 1.0))
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        drop = cum - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        probs[order[drop]] = 0.0
    min_p = float(s.get("min_p", 0.0))
    if min_p > 0:
        probs[probs < min_p * probs.max()] = 0.0
    kept = probs > 0
    scaled = torch.where(kept, logits / temp, torch.full_like(logits, -float("inf")))
    return int(torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=gen))
