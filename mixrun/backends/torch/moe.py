"""A mixture-of-experts FFN (qwen3moe) in plain PyTorch, with no distributed code in it.

The equation is llama.cpp's ``build_moe_ffn`` for qwen3moe (src/llama-graph.cpp, src/models/qwen3moe.cpp): router
logits ``ffn_gate_inp x``, a softmax over all experts, the top ``n_used`` of them, their probabilities divided by
their sum (clamped below at 2^-14, as llama.cpp does), each chosen expert's SwiGLU ``down(silu(gate x) * up x)``,
and the sum of the experts' outputs weighted by those probabilities. No shared expert, no selection bias, no weight
scale.

The experts' matrices stay stacked as in the GGUF: ``gate_exps`` and ``up_exps`` hold ``n_local`` experts'
``(ffn, dim)`` matrices one after another by rows, ``down_exps`` their ``(dim, ffn)`` ones. A module may hold only
the contiguous experts ``[first, first + n_local)``: expert parallelism inside a TP group
(:func:`.parallel.apply_tp`) gives each member a slice and all-reduces the members' outputs, which are then partial
sums (experts the member does not hold contribute nothing). The router is whole on every member, so each one makes
the same choice.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mixrun.backends.torch.linear import Product, stacked, weight

WEIGHTS_SUM_MIN = 6.103515625e-5  # llama.cpp clamps the chosen probabilities' sum to the smallest normal float16


class MoEFeedForward(nn.Module):
    """The routed experts of one layer; holds experts ``[first, first + n_local)`` of ``n_expert``."""

    def __init__(self, cfg: Any, first: int = 0, n_local: int | None = None) -> None:
        super().__init__()
        n = cfg.n_expert if n_local is None else n_local
        self.n_expert, self.n_used, self.ffn = cfg.n_expert, cfg.n_expert_used, cfg.n_ff_exp
        self.first, self.n_local, self.dim = first, n, cfg.dim
        self.router = nn.Linear(cfg.dim, cfg.n_expert, bias=False)  # ffn_gate_inp, whole on every TP member
        with warnings.catch_warnings():  # a member without experts (more members than experts) has empty ones
            warnings.filterwarnings("ignore", "Initializing zero-element tensors", UserWarning)
            self.gate_exps = nn.Linear(cfg.dim, n * cfg.n_ff_exp, bias=False)  # (n ffn, dim): expert after expert
            self.up_exps = nn.Linear(cfg.dim, n * cfg.n_ff_exp, bias=False)
            self.down_exps = nn.Linear(cfg.n_ff_exp, n * cfg.dim, bias=False)  # (n dim, ffn)
        # made by prepare() once the weights are loaded: how a step computes with each
        self.route: Product | None = None
        self.experts: list[tuple[Product, Product, Product]] = []  # (gate, up, down) of each local expert

    def linears(self) -> tuple[nn.Linear, ...]:
        return self.router, self.gate_exps, self.up_exps, self.down_exps

    def prepare(self, device: torch.device, split: int) -> None:
        n = self.n_local
        self.route = weight(self.router, device, split)
        self.experts = list(zip(stacked(self.gate_exps, n, device, split), stacked(self.up_exps, n, device, split),
                                stacked(self.down_exps, n, device, split), strict=True))

    def choose(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts each token of ``x`` (T, dim) runs, (T, n_used) global indices by falling probability, and
        their weights, (T, n_used) float32 summing to 1 per token."""
        assert self.route is not None, "setup_cache() first"
        probs = torch.softmax(self.route(x).float(), dim=-1)  # (T, n_expert)
        w, idx = torch.topk(probs, self.n_used, dim=-1)  # (T, n_used) each
        return w / w.sum(dim=-1, keepdim=True).clamp_min(WEIGHTS_SUM_MIN), idx

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Local expert ``e``'s SwiGLU on ``x`` (T, dim) -> (T, dim)."""
        gate, up, down = self.experts[e]
        return down(F.silu(gate(x)).mul_(up(x)))

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """(T, dim) -> (T, dim): the weighted sum of the chosen experts this module holds (with expert parallelism
        a partial sum), plus ``add`` (a residual, as in :meth:`.model.FeedForward.forward`). One token reads only
        its chosen experts' matrices; several tokens run each chosen expert once over the rows that chose it."""
        w, idx = self.choose(x)
        local = idx - self.first  # (T, n_used): local expert indices, outside [0, n_local) for other members'
        if x.shape[0] == 1:
            out = torch.zeros_like(x)
            for j, e in enumerate(local[0].tolist()):  # in llama.cpp's order of the sum: by falling probability
                if 0 <= e < self.n_local:
                    out.add_(self.expert(e, x).mul_(w[0, j].to(x.dtype)))
        else:
            out = torch.zeros_like(x)
            held = (local >= 0) & (local < self.n_local)  # (T, n_used)
            for e in torch.unique(local[held]).tolist():
                rows, slot = torch.nonzero(local == e, as_tuple=True)  # the tokens that chose e, and where
                y = self.expert(e, x.index_select(0, rows))  # (rows, dim)
                out.index_add_(0, rows, y.mul_(w[rows, slot].to(x.dtype)[:, None]))  # (rows,) -> (rows, 1)
        return out if add is None else out + add
