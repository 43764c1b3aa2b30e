"""``iso_c``: isotropic merging: flatten the spectrum of the summed core.

Paper: No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces
(Iso-C), https://arxiv.org/abs/2502.04959

    M = Σₙ wₙ Cₙ = P diag(s) Qᵀ       (SVD of a k×k core, batched over layers)
    iso_c = α · s̄ · P_r Q_rᵀ           s̄ = mean of the r nonzero singular values

Task arithmetic leaves a few dominant directions that drown the others ("tasks left
behind"); replacing the spectrum by its mean gives every direction of the merged update
the same weight. Choices where the paper is silent for a low-rank sum: only the r
numerically nonzero singular values are flattened (flattening zeros would invent
directions no adapter asked for). ``norm=frobenius`` uses s̄ = √(mean s²) instead of the
mean so that ‖iso_c‖_F = ‖M‖_F: the fused update has the same size as the plain sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters_zoo.errors import InvalidConfig
from fusion.methods.base import FusionContext, FusionMethod, register
from fusion.methods.linear import linear_sum

NORMS = ("mean", "frobenius")
RANK_RTOL = 1e-5  # singular values below RANK_RTOL · s_max count as zero (float32 noise)


@dataclass
class IsoCParams:
    scale: float = 1.0  # α of the paper
    norm: str = "mean"  # mean (the paper) | frobenius (keep ‖M‖_F)

    def validate(self) -> None:
        if self.norm not in NORMS:
            raise InvalidConfig(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")


def flatten_spectrum(m: torch.Tensor, norm: str = "mean") -> torch.Tensor:
    """(L, k, k) -> (L, k, k) with every nonzero singular value replaced by their mean."""
    P, s, Qh = torch.linalg.svd(m)  # (L, k, k), (L, k), (L, k, k)
    nonzero = s > RANK_RTOL * s[:, :1].clamp(min=torch.finfo(torch.float32).tiny)  # (L, k)
    count = nonzero.sum(dim=1, keepdim=True).clamp(min=1)  # (L, 1)
    if norm == "mean":
        level = (s * nonzero).sum(dim=1, keepdim=True) / count
    else:
        level = ((s.square() * nonzero).sum(dim=1, keepdim=True) / count).sqrt()
    flat = level * nonzero  # (L, k)
    return (P * flat.unsqueeze(1)) @ Qh


@register
class IsoC(FusionMethod):
    name = "iso_c"
    paper = "https://arxiv.org/abs/2502.04959"
    Params = IsoCParams
    elementwise = False

    def combine(self, cores: torch.Tensor, weights: torch.Tensor, p: IsoCParams, ctx: FusionContext) -> torch.Tensor:
        summed = linear_sum(cores, weights)  # (L, k, k)
        return p.scale * flatten_spectrum(summed, p.norm)
