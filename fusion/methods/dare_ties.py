"""``dare_ties``: DARE drop-and-rescale, then TIES sign election and disjoint merge.

Paper: Language Models are Super Mario (DARE), https://arxiv.org/abs/2311.03099 (with
TIES-Merging, https://arxiv.org/abs/2306.01708, for the election and disjoint mean)

DARE replaces TIES's magnitude trim: entries are dropped at random with probability
1 − ``density`` and rescaled by 1/``density`` (seeded), then the sign is elected by mass
and the agreeing entries are averaged, as in ``ties``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fusion.methods.base import FusionContext, FusionMethod, check_density, register
from fusion.methods.sparsify import check_majority_sign, random_drop, seeded_generator
from fusion.methods.ties import ties_merge


@dataclass
class DareTiesParams:
    density: float = 0.5
    seed: int = 0
    majority_sign: str = "total"  # total | frequency
    scale: float = 1.0  # λ

    def validate(self) -> None:
        check_density(self.density)
        check_majority_sign(self.majority_sign)


@register
class DareTies(FusionMethod):
    name = "dare_ties"
    paper = "https://arxiv.org/abs/2311.03099"
    Params = DareTiesParams

    def combine(self, cores: torch.Tensor, weights: torch.Tensor, p: DareTiesParams, ctx: FusionContext):
        dropped = random_drop(cores, p.density, seeded_generator(p.seed))  # (L, N, E)
        return p.scale * ties_merge(dropped, weights, p.majority_sign)
