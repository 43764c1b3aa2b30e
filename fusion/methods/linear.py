"""``linear``: task arithmetic, Σₙ wₙ Cₙ. Exact: the fused ΔW is the weighted sum of the ΔWs.

Paper: Editing Models with Task Arithmetic, https://arxiv.org/abs/2212.04089
In a shared basis the sum of cores is the sum of the dense updates, with no cross-terms
(unlike averaging LoRA factors), so this is the reference every other method is tested against.
"""

from __future__ import annotations

import torch

from fusion.methods.base import FusionContext, FusionMethod, NoParams, register, weighted


def linear_sum(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(L, N, ...) , (N,) -> (L, ...)."""
    return weighted(x, weights).sum(dim=1)


@register
class Linear(FusionMethod):
    name = "linear"
    paper = "https://arxiv.org/abs/2212.04089"
    Params = NoParams

    def combine(self, cores: torch.Tensor, weights: torch.Tensor, p: NoParams, ctx: FusionContext) -> torch.Tensor:
        return linear_sum(cores, weights)  # (L, E)
