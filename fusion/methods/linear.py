"""``linear``: task arithmetic, Σₙ wₙ Cₙ. Exact: the fused ΔW is the weighted sum of the ΔWs.

Paper: Editing Models with Task Arithmetic, https://arxiv.org/abs/2212.04089
In a shared basis the sum of cores is the sum of the dense updates, with no cross-terms
(unlike averaging LoRA factors), so this is the reference every other method is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusion.methods.base import FusionContext, FusionMethod, NoParams, register


def linear_sum(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(L, N, ...) , (N,) -> (L, ...): Σₙ wₙ xₙ, accumulated in source order (``weighted_sum``)."""
    return weighted_sum(x.unbind(1), weights)


def weighted_sum(xs: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """x₀ w₀ + x₁ w₁ + …, one elementwise add per source, in order: every element is computed
    the same way whatever else is stacked with it, so the server's packed reduction
    (:func:`fusion.mixture.reduce`) and ``fuse`` give the same bits."""
    w = weights.to(xs[0])
    out = xs[0] * w[0]
    term = torch.empty_like(out) if len(xs) > 1 else None  # one buffer for every wₙ xₙ: two allocations in all
    for n in range(1, len(xs)):
        out.add_(torch.mul(xs[n], w[n], out=term))  # the same two roundings as out + xs[n] * w[n]
    return out


@register
class Linear(FusionMethod):
    name = "linear"
    paper = "https://arxiv.org/abs/2212.04089"
    Params = NoParams

    def combine(self, cores: torch.Tensor, weights: torch.Tensor, p: NoParams, ctx: FusionContext) -> torch.Tensor:
        return linear_sum(cores, weights)  # (L, E)
