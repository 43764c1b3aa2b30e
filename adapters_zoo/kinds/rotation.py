"""``rotation``: rotate the top singular vectors (Spectral Adapter^R).

Paper: Spectral Adapter: Fine-Tuning in Spectral Space, https://arxiv.org/abs/2405.13952
The top r left and right singular vectors are rotated by orthogonal matrices built from
trainable generators with the Cayley transform, optionally with a rescaling c:

    R = (I − K)(I + K)⁻¹,  K = (G − Gᵀ)/2 skew        G ∈ R^{r×r}, init 0 → R = I
    W' = U_r R_U diag(σ ⊙ c) R_Vᵀ V_rᵀ + (rest of W)
    core = R_U diag(σ ⊙ c) R_Vᵀ − diag(σ)  embedded at [a, b)

Choices where the paper is silent: the generator is stored as a full r×r matrix G whose
skew part is used, so the trainable count is the paper's 2r² per layer (+r with c).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters_zoo.basis import LayerBasis
from adapters_zoo.kinds.base import Kind, Params, SpectralConfig, embed_block


@dataclass
class RotationConfig(SpectralConfig):
    scale: bool = True  # also learn c ∈ R^r (init 1)


def skew(g: torch.Tensor) -> torch.Tensor:
    return (g - g.transpose(-1, -2)) / 2


def cayley(k_skew: torch.Tensor) -> torch.Tensor:
    """R = (I − K)(I + K)⁻¹ for skew K: an orthogonal matrix (det +1)."""
    eye = torch.eye(k_skew.shape[-1], dtype=k_skew.dtype, device=k_skew.device)
    return torch.linalg.solve(eye + k_skew, eye - k_skew, left=False)


class RotationKind(Kind):
    name = "rotation"
    paper = "https://arxiv.org/abs/2405.13952"
    Config = RotationConfig

    def param_shapes(self, out_f, in_f, k, cfg: RotationConfig):
        a, b = cfg.directions(k)
        r = b - a
        shapes = {"G_U": (r, r), "G_V": (r, r)}
        if cfg.scale:
            shapes["c"] = (r,)
        return shapes

    def init_params(self, lb: LayerBasis, cfg: RotationConfig, layer: str) -> Params:
        shapes = self.param_shapes(lb.out_features, lb.in_features, lb.k, cfg)
        params = {"G_U": torch.zeros(shapes["G_U"]), "G_V": torch.zeros(shapes["G_V"])}
        if cfg.scale:
            params["c"] = torch.ones(shapes["c"])
        return params

    def core(self, params: Params, lb: LayerBasis, cfg: RotationConfig) -> torch.Tensor:
        a, b = cfg.directions(lb.k)
        sigma = lb.S[a:b]
        r_u = cayley(skew(params["G_U"]))  # (r, r)
        r_v = cayley(skew(params["G_V"]))  # (r, r)
        scaled = sigma * params["c"] if cfg.scale else sigma
        block = r_u @ torch.diag(scaled) @ r_v.T - torch.diag(sigma)
        return embed_block(block, a, lb.k)
