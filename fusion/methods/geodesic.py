"""``geodesic``: fuse rotation adapters in generator space so the result is still a rotation.

Papers: Spectral Adapter^R (the rotation kind), https://arxiv.org/abs/2405.13952; the
Cayley parametrisation of rotations, as in Orthogonal Fine-Tuning, https://arxiv.org/abs/2306.07280

Summing rotation cores R_U diag(σc) R_Vᵀ − diag(σ) gives a matrix that is no longer a
rotated spectrum. Instead combine what the rotations are made of, on the full k directions:

    K = Σₙ wₙ Kₙ  (skew generators embedded at each adapter's slice: still skew)
    R_U = cayley(K_U), R_V = cayley(K_V)          orthogonal by construction
    c = 1 + Σₙ wₙ (cₙ − 1)                         the rescaling, combined as deviations from 1
    core = R_U diag(σ ⊙ c) R_Vᵀ − diag(σ)

With one adapter of weight 1 this is that adapter's core exactly; with weight w it walks
the Cayley curve from the identity towards the adapter's rotation. Adapters of other kinds
in the same mixture are added linearly (Σ wₙ Cₙ), since they have no rotation to keep.
"""

from __future__ import annotations

import torch

from adapters_zoo.format import Adapter
from adapters_zoo.kinds.base import embed_block
from adapters_zoo.kinds.rotation import cayley, skew
from fusion.methods.base import FusionContext, FusionMethod, NoParams, register

ROTATION_KIND = "rotation"


def fused_rotations(
    adapters: list[Adapter], weights: list[float], layer: str, k: int, device=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R_U (k, k), R_V (k, k), c (k,)) of the weighted rotation adapters on ``layer``."""
    K_U = torch.zeros(k, k, device=device)
    K_V = torch.zeros(k, k, device=device)
    c = torch.ones(k, device=device)
    for adapter, w in zip(adapters, weights):
        if adapter.kind != ROTATION_KIND or layer not in adapter.params:
            continue
        params = {n: t.to(device=device, dtype=torch.float32) for n, t in adapter.params[layer].items()}
        a, b = adapter.cfg.directions(k)
        K_U = K_U + w * embed_block(skew(params["G_U"]), a, k)  # (k, k) skew
        K_V = K_V + w * embed_block(skew(params["G_V"]), a, k)
        if "c" in params:
            c[a:b] = c[a:b] + w * (params["c"] - 1.0)
    return cayley(K_U), cayley(K_V), c


@register
class Geodesic(FusionMethod):
    name = "geodesic"
    paper = "https://arxiv.org/abs/2405.13952"
    Params = NoParams
    elementwise = False

    def combine(self, cores: torch.Tensor, weights: torch.Tensor, p: NoParams, ctx: FusionContext) -> torch.Tensor:
        is_rotation = torch.tensor([a.kind == ROTATION_KIND for a in ctx.adapters], device=cores.device)
        if not bool(is_rotation.any()):
            ctx.notes.append("geodesic: no rotation adapter in the mixture; the cores were summed linearly")
        others = weights.to(cores) * (~is_rotation).to(cores)  # (N,) weights of non-rotation adapters
        out = torch.einsum("n,lnij->lij", others, cores)  # (L, k, k)
        w = weights.tolist()
        for i, layer in enumerate(ctx.layers):
            if not bool((ctx.present[i] & is_rotation).any()):
                continue
            sigma = ctx.basis[layer].S.to(cores)  # (k,)
            R_U, R_V, c = fused_rotations(ctx.adapters, w, layer, ctx.k, cores.device)
            out[i] += R_U @ torch.diag(sigma * c) @ R_V.T - torch.diag(sigma)
        return out
