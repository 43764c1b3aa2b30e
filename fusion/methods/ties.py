"""``ties``: TIES-Merging: trim, elect sign, disjoint merge.

Paper: TIES-Merging: Resolving Interference When Merging Models, https://arxiv.org/abs/2306.01708

    1. trim    keep each adapter's top ``density`` fraction of core entries by magnitude
    2. elect   γ = sign(Σₙ wₙ τ̂ₙ) per entry (``majority_sign=total``: by mass)
    3. merge   per entry, the mean of wₙ τ̂ₙ over the adapters whose sign agrees with γ
    4. scale   λ · merged (the paper's λ)

With unit weights this is the paper's algorithm on cores. Weights scale each adapter's
trimmed entries before the election (an adapter of weight 0 has no vote), as mergekit does;
the disjoint mean divides by the count of agreeing adapters, as the paper and PEFT do.
Trimming is per layer (per core), as in PEFT and mergekit, not over the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fusion.methods.base import FusionContext, FusionMethod, check_density, register, weighted
from fusion.methods.sparsify import check_majority_sign, disjoint_mean, elect_sign, magnitude_trim


@dataclass
class TiesParams:
    density: float = 0.2  # the paper's default k = 20%
    majority_sign: str = "total"  # total | frequency
    scale: float = 1.0  # λ

    def validate(self) -> None:
        check_density(self.density)
        check_majority_sign(self.majority_sign)


def ties_merge(x: torch.Tensor, weights: torch.Tensor, majority_sign: str) -> torch.Tensor:
    """Elect + disjoint mean of already sparsified entries x (L, N, E) -> (L, E)."""
    xw = weighted(x, weights)
    return disjoint_mean(xw, elect_sign(xw, majority_sign))


@register
class Ties(FusionMethod):
    name = "ties"
    paper = "https://arxiv.org/abs/2306.01708"
    Params = TiesParams

    def combine(self, cores: torch.Tensor, weights: torch.Tensor, p: TiesParams, ctx: FusionContext) -> torch.Tensor:
        trimmed = magnitude_trim(cores, p.density)  # (L, N, E)
        return p.scale * ties_merge(trimmed, weights, p.majority_sign)
