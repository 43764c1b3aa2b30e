"""``tsv``: Task Singular Vectors merge (TSV-Merge): low-rank per task, decorrelated, summed.

Paper: Task Singular Vectors: Reducing Task Interference in Model Merging,
https://arxiv.org/abs/2412.00081

Per layer, on k×k cores (batched over layers and adapters):

    wₙ Cₙ = Pₙ diag(sₙ) Qₙᵀ              keep the top r = ⌈f·k⌉ components (f = 1/N by default)
    P = [P₁ | … | P_N]  (k, N·r)          Q likewise, s = [s₁ … s_N]
    P⊥ = polar(P), Q⊥ = polar(Q)          the nearest matrices with orthonormal columns
    tsv = α · P⊥ diag(s) Q⊥ᵀ

Orthogonalising the concatenated task singular vectors removes the overlap between tasks'
subspaces (the interference the paper measures), keeping each task's strongest directions.
Choices: the weights scale each task's singular values; components with a zero singular
value (an adapter absent from a layer, or of lower rank) are dropped before the
orthogonalisation so they cannot bend the others; the polar factor keeps only the
nonzero singular values of the concatenation (unique even when N·r > k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters_zoo.errors import InvalidConfig
from fusion.methods.base import FusionContext, FusionMethod, register, weighted
from fusion.methods.iso_c import RANK_RTOL
from fusion.methods.sparsify import ceil_fraction


@dataclass
class TsvParams:
    rank_fraction: float | None = None  # of k kept per task; None: 1/N, as in the paper
    scale: float = 1.0  # α

    def validate(self) -> None:
        if self.rank_fraction is not None and not 0.0 < self.rank_fraction <= 1.0:
            raise InvalidConfig(f"rank_fraction must be in (0, 1], got {self.rank_fraction}")


def polar_factor(x: torch.Tensor) -> torch.Tensor:
    """(…, k, m) -> the orthonormal factor P_r Q_rᵀ of x = P S Qᵀ over its nonzero singular values."""
    P, s, Qh = torch.linalg.svd(x, full_matrices=False)
    nonzero = (s > RANK_RTOL * s[..., :1].clamp(min=torch.finfo(torch.float32).tiny)).to(x)  # (…, min(k, m))
    return (P * nonzero.unsqueeze(-2)) @ Qh


def tsv_merge(cores: torch.Tensor, weights: torch.Tensor, rank: int) -> torch.Tensor:
    """(L, N, k, k), (N,) -> (L, k, k)."""
    L, N, k, _ = cores.shape
    P, s, Qh = torch.linalg.svd(weighted(cores, weights))  # (L, N, k, k), (L, N, k), (L, N, k, k)
    P, s, Q = P[..., :rank], s[..., :rank], Qh[..., :rank, :].transpose(-1, -2)  # (L, N, k, r), (L, N, r)
    live = ((s > RANK_RTOL * s[..., :1]) & (s > 0)).to(s)  # (L, N, r), per adapter's own scale
    P, Q, s = P * live.unsqueeze(-2), Q * live.unsqueeze(-2), s * live
    P_cat = P.permute(0, 2, 1, 3).reshape(L, k, N * rank)  # (L, k, N·r)
    Q_cat = Q.permute(0, 2, 1, 3).reshape(L, k, N * rank)
    s_cat = s.reshape(L, 1, N * rank)
    merged = (polar_factor(P_cat) * s_cat) @ polar_factor(Q_cat).transpose(-1, -2)  # (L, k, k)
    return merged


@register
class Tsv(FusionMethod):
    name = "tsv"
    paper = "https://arxiv.org/abs/2412.00081"
    Params = TsvParams
    elementwise = False

    def combine(self, cores: torch.Tensor, weights: torch.Tensor, p: TsvParams, ctx: FusionContext) -> torch.Tensor:
        n, k = cores.shape[1], cores.shape[-1]
        rank = min(k, ceil_fraction(k, p.rank_fraction if p.rank_fraction is not None else 1.0 / n))
        return p.scale * tsv_merge(cores, weights, rank)
