"""``dare_linear``: DARE (drop and rescale), then task arithmetic.

Paper: Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch
(DARE), https://arxiv.org/abs/2311.03099

Each core entry is dropped with probability p = 1 − ``density`` and the survivors are
rescaled by 1/(1 − p), so every entry keeps its expected value; then Σₙ wₙ Ĉₙ. The drop
mask is drawn from a generator seeded by ``seed``: the same mixture fuses the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fusion.methods.base import FusionContext, FusionMethod, check_density, register
from fusion.methods.linear import linear_sum
from fusion.methods.sparsify import random_drop, seeded_generator


@dataclass
class DareParams:
    density: float = 0.5  # keep probability 1 − p
    seed: int = 0

    def validate(self) -> None:
        check_density(self.density)


@register
class DareLinear(FusionMethod):
    name = "dare_linear"
    paper = "https://arxiv.org/abs/2311.03099"
    Params = DareParams

    def combine(self, cores: torch.Tensor, weights: torch.Tensor, p: DareParams, ctx: FusionContext) -> torch.Tensor:
        dropped = random_drop(cores, p.density, seeded_generator(p.seed))  # (L, N, E)
        return linear_sum(dropped, weights)
