"""``magnitude_prune``: keep each adapter's largest core entries, then task arithmetic.

Paper: the trim step of TIES-Merging, https://arxiv.org/abs/2306.01708 (PEFT's
``magnitude_prune`` combination), applied to core entries.

In a fixed basis a core entry is one coordinate of the dense update (ΔW = Σᵢⱼ Cᵢⱼ uᵢ vⱼᵀ,
orthonormal rank-one pieces), so pruning cores is pruning ΔW in that coordinate system;
pruning LoRA factors, as PEFT does, is not (B A has cross-terms).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fusion.methods.base import FusionContext, FusionMethod, check_density, register
from fusion.methods.linear import linear_sum
from fusion.methods.sparsify import magnitude_trim


@dataclass
class MagnitudePruneParams:
    density: float = 0.5

    def validate(self) -> None:
        check_density(self.density)


@register
class MagnitudePrune(FusionMethod):
    name = "magnitude_prune"
    paper = "https://arxiv.org/abs/2306.01708"
    Params = MagnitudePruneParams

    def combine(self, cores: torch.Tensor, weights: torch.Tensor, p: MagnitudePruneParams, ctx: FusionContext):
        return linear_sum(magnitude_trim(cores, p.density), weights)  # (L, E)
