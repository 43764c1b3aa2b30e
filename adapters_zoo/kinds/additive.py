"""``additive``: additive tuning of the top singular vectors (Spectral Adapter^A).

Paper: Spectral Adapter: Fine-Tuning in Spectral Space, https://arxiv.org/abs/2405.13952
The singular vectors of directions [a, b) get trainable additive updates, init 0:

    W' = (U_s + A_U) Σ_s (V_s + A_V)ᵀ + (rest of W)          A_U (out, r), A_V (in, r)

ΔW is split exactly into its part inside the basis and a low-rank residual. With
Ũ = U_s + A_U = U_k P_U + R_U (P_U = U_kᵀ Ũ, R_U ⟂ U_k) and likewise Ṽ:

    core     = P_U Σ_s P_Vᵀ − E_s Σ_s E_sᵀ                  (k, k)
    residual = [U_k P_U Σ_s | R_U Σ_s] · [R_Vᵀ ; Ṽᵀ]        rank ≤ 2r

so ``U_k core V_kᵀ + B A = Ũ Σ_s Ṽᵀ − U_s Σ_s V_sᵀ`` exactly. Adapters on disjoint slices
(``--slice``) touch disjoint singular vectors: the paper's route to multi-adapter fusion.
"""

from __future__ import annotations

import torch

from adapters_zoo.basis import LayerBasis
from adapters_zoo.kinds.base import Kind, Params, SpectralConfig, embed_block


class AdditiveKind(Kind):
    name = "additive"
    paper = "https://arxiv.org/abs/2405.13952"
    Config = SpectralConfig

    def param_shapes(self, out_f, in_f, k, cfg: SpectralConfig):
        a, b = cfg.directions(k)
        return {"A_U": (out_f, b - a), "A_V": (in_f, b - a)}

    def init_params(self, lb: LayerBasis, cfg: SpectralConfig, layer: str) -> Params:
        a, b = cfg.directions(lb.k)
        return {"A_U": torch.zeros(lb.out_features, b - a), "A_V": torch.zeros(lb.in_features, b - a)}

    @staticmethod
    def _split(params: Params, lb: LayerBasis, cfg: SpectralConfig):
        a, b = cfg.directions(lb.k)
        u_t = lb.U[:, a:b] + params["A_U"]  # Ũ (out, r)
        v_t = lb.V[:, a:b] + params["A_V"]  # Ṽ (in, r)
        p_u, p_v = lb.U.T @ u_t, lb.V.T @ v_t  # (k, r)
        return a, b, u_t, v_t, p_u, p_v

    def core(self, params: Params, lb: LayerBasis, cfg: SpectralConfig) -> torch.Tensor:
        a, b, _, _, p_u, p_v = self._split(params, lb, cfg)
        sigma = lb.S[a:b]
        return p_u @ torch.diag(sigma) @ p_v.T - embed_block(torch.diag(sigma), a, lb.k)

    def residual(self, params: Params, lb: LayerBasis, cfg: SpectralConfig):
        a, b, u_t, v_t, p_u, p_v = self._split(params, lb, cfg)
        sigma = lb.S[a:b]
        r_u = u_t - lb.U @ p_u  # (out, r) ⟂ U_k
        r_v = v_t - lb.V @ p_v  # (in, r) ⟂ V_k
        B = torch.cat([(lb.U @ p_u) * sigma, r_u * sigma], dim=1)  # (out, 2r)
        A = torch.cat([r_v.T, v_t.T], dim=0)  # (2r, in)
        return B, A
