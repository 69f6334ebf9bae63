"""The dense SwiGLU feed-forward, shared by a dense layer (:mod:`.model`) and a MoE layer's shared expert
(:mod:`.moe`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixrun.backends.torch.linear import Product, weight


class FeedForward(nn.Module):
    """SwiGLU ``w2(silu(gate x) * up x)``: gate and up as one fused linear ``w13``, down as ``w2``; ``width`` rows
    of each (a tensor-parallel member's share of them)."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * width, bias=False)  # gate rows, then up rows
        self.w2 = nn.Linear(width, dim, bias=False)  # down
        self.gate_up: Product | None = None  # w13 as a step computes it (.linear), made by prepare()
        self.down: Product | None = None  # w2

    def linears(self) -> tuple[nn.Linear, ...]:
        return self.w13, self.w2

    def prepare(self, device: torch.device, split: int) -> None:
        self.gate_up, self.down = weight(self.w13, device, split), weight(self.w2, device, split)

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """(T, dim) -> (T, dim); with tensor parallelism a partial sum. ``add``: a tensor the product adds into
        (the residual), as in :meth:`.model.Attention.forward`."""
        assert self.gate_up is not None and self.down is not None, "setup_cache() first"
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (T, width) each
        return self.down(F.silu(gate).mul_(up), add)
