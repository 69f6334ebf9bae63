"""A mixture-of-experts FFN (qwen3moe, glm4moe, gpt-oss) in plain PyTorch, with no distributed code in it.

The equation is llama.cpp's ``build_moe_ffn`` (src/llama-graph.cpp; src/models/qwen3moe.cpp, glm4-moe.cpp,
openai-moe.cpp): router
logits ``ffn_gate_inp x`` (plus its bias, gpt-oss); probabilities by a softmax over all experts (qwen3moe), a
sigmoid of each (glm4moe), or none (gpt-oss: the chosen logits are softmaxed into weights); the top ``n_used``,
chosen on the probabilities plus a per-expert selection bias where the model has one (``exp_probs_b``), weighed by
the probabilities without it; the weights divided by their sum (clamped below at 2^-14, as llama.cpp does) where
the model says so, and scaled; each chosen expert's SwiGLU ``down(silu(gate x) * up x)`` (gpt-oss: biases on
gate, up and down, and the clamped SwiGLU-OAI of ggml's ``swiglu_oai``), summed with those weights; plus a shared
expert's SwiGLU where the model has one.

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

from mixrun.backends.torch.ffn import FeedForward
from mixrun.backends.torch.linear import Product, stacked, weight

WEIGHTS_SUM_MIN = 6.103515625e-5  # llama.cpp clamps the chosen probabilities' sum to the smallest normal float16
OAI_ALPHA, OAI_LIMIT = 1.702, 7.0  # gpt-oss's SwiGLU (llama-graph.cpp build_moe_ffn, LLM_FFN_SWIGLU_OAI_MOE)


class MoEFeedForward(nn.Module):
    """The routed experts of one layer; holds experts ``[first, first + n_local)`` of ``n_expert``."""

    def __init__(self, cfg: Any, first: int = 0, n_local: int | None = None, shared: int | None = None) -> None:
        """``shared``: this member's rows of the shared expert (default: all of them)."""
        super().__init__()
        n = cfg.n_expert if n_local is None else n_local
        self.n_expert, self.n_used, self.ffn = cfg.n_expert, cfg.n_expert_used, cfg.n_ff_exp
        self.first, self.n_local, self.dim = first, n, cfg.dim
        self.gating, self.norm_w, self.w_scale, self.oai = cfg.gating, cfg.norm_w, cfg.w_scale, cfg.activation == "oai"
        biased = cfg.moe_bias  # router and experts with biases (gpt-oss)
        self.router = nn.Linear(cfg.dim, cfg.n_expert, bias=biased)  # ffn_gate_inp, whole on every TP member
        # exp_probs_b: added to the probabilities to choose experts (not to weigh them); whole on every member
        self.probs_bias = nn.Parameter(torch.empty(cfg.n_expert)) if cfg.probs_bias else None
        width = cfg.n_ff_shared if shared is None else shared
        self.shared = FeedForward(cfg.dim, width) if cfg.n_ff_shared else None  # rows sharded like a dense FFN
        with warnings.catch_warnings():  # a member without experts (more members than experts) has empty ones
            warnings.filterwarnings("ignore", "Initializing zero-element tensors", UserWarning)
            self.gate_exps = nn.Linear(cfg.dim, n * cfg.n_ff_exp, bias=biased)  # (n ffn, dim): expert after expert
            self.up_exps = nn.Linear(cfg.dim, n * cfg.n_ff_exp, bias=biased)
            self.down_exps = nn.Linear(cfg.n_ff_exp, n * cfg.dim, bias=biased)  # (n dim, ffn)
        # made by prepare() once the weights are loaded: how a step computes with each
        self.route: Product | None = None
        self.experts: list[tuple[Product, Product, Product]] = []  # (gate, up, down) of each local expert

    def linears(self) -> tuple[nn.Linear, ...]:
        extra = self.shared.linears() if self.shared is not None else ()
        return self.router, self.gate_exps, self.up_exps, self.down_exps, *extra

    def prepare(self, device: torch.device, split: int) -> None:
        n = self.n_local
        if self.shared is not None:
            self.shared.prepare(device, split)
        self.route = weight(self.router, device, split)
        self.experts = list(zip(stacked(self.gate_exps, n, device, split), stacked(self.up_exps, n, device, split),
                                stacked(self.down_exps, n, device, split), strict=True))

    def choose(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts each token of ``x`` (T, dim) runs, (T, n_used) global indices by falling probability, and
        their weights, (T, n_used) float32 (summing to 1 per token where they are normalized and not scaled)."""
        assert self.route is not None, "setup_cache() first"
        logits = self.route(x).float()  # (T, n_expert)
        if self.gating == "softmax_weight":  # chosen by logit, weighed by a softmax over the chosen ones
            top = torch.topk(logits, self.n_used, dim=-1)
            return torch.softmax(top.values, dim=-1), top.indices
        probs = torch.sigmoid(logits) if self.gating == "sigmoid" else torch.softmax(logits, dim=-1)
        if self.probs_bias is None:
            w, idx = torch.topk(probs, self.n_used, dim=-1)  # (T, n_used) each
        else:  # chosen on the biased probabilities, weighed by the plain ones
            idx = torch.topk(probs + self.probs_bias.float(), self.n_used, dim=-1).indices
            w = probs.gather(-1, idx)
        if self.norm_w:
            w = w / w.sum(dim=-1, keepdim=True).clamp_min(WEIGHTS_SUM_MIN)
        return (w * self.w_scale if self.w_scale != 1.0 else w), idx

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Local expert ``e``'s SwiGLU on ``x`` (T, dim) -> (T, dim)."""
        gate, up, down = self.experts[e]
        if self.oai:  # ggml swiglu_oai: x = min(gate, 7), y = clamp(up, -7, 7), x * sigmoid(1.702 x) * (y + 1)
            g = gate(x).clamp_(max=OAI_LIMIT)
            return down(g.mul_(torch.sigmoid(g * OAI_ALPHA)).mul_(up(x).clamp_(-OAI_LIMIT, OAI_LIMIT).add_(1.0)))
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
        if self.shared is not None:
            out = self.shared(x, out)  # the shared expert's output added to the routed ones'
        return out if add is None else out + add
