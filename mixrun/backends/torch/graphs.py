"""CUDA graphs of a rank's decode step.

On a GPU an eager decode step is launch-bound: a layer is about thirty small kernels, each costing microseconds of
Python and launch time against a few microseconds of work. A CUDA graph records the step once
(:class:`.step.FoldedStep`: the residual adds folded into the products), with the position as a tensor so no shape
depends on it (:meth:`mixrun.backends.torch.model.Attention.forward`), and replays it for every token.
Stages with tensor parallelism stay eager: their all-reduces would have to be captured too.
"""

from __future__ import annotations

import torch

from mixrun.backends.torch.model import Transformer
from mixrun.backends.torch.step import FoldedStep


class GraphedStep:
    """One decode step of ``model`` (its layers, then its logits on the last stage) as a replayable CUDA graph.

    The inputs are copied into static tensors before each replay; the result is a static tensor that the next
    replay overwrites, so callers copy out what they keep."""

    def __init__(self, model: Transformer, dtype: torch.dtype, device: torch.device, logits: bool) -> None:
        self.model, self.logits = model, logits
        self.layers = FoldedStep(model, None)  # one stage without tensor parallelism: nothing to all-reduce
        self.x = torch.zeros(1, model.cfg.dim, dtype=dtype, device=device)
        # capture at the last cache slot: the warm-up's writes land where the real step at that slot overwrites
        self.pos = torch.full((1,), model.max_pos - 1, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # warm-up on a side stream, as graph capture requires
                self._run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.out = self._run()

    def _run(self) -> torch.Tensor:
        h = self.layers(self.x, self.pos)
        return self.model.logits(h) if self.logits else h

    def __call__(self, h: torch.Tensor, pos: int) -> torch.Tensor:
        self.x.copy_(h)
        self.pos.fill_(pos)
        self.graph.replay()
        return self.out
