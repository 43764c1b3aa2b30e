"""``scale``: rescale the top singular values (SpecLoRA-style).

Paper: Weight Spectra Induced Efficient Model Adaptation, https://arxiv.org/abs/2505.23099
Fine-tuning mostly amplifies the top singular values, so the adapter learns a rescaling
of the top r directions: σᵢ → σᵢ(1 + λᵢ), λ ∈ R^r initialised to 0 (the base model).

    core = diag(σ_[a,b) ⊙ λ) embedded at [a, b)          (diagonal: elementwise serving path)
    residual (optional, lora_rank q > 0) = (alpha / q) · B A,  B (out, q) = 0,  A (q, in) kaiming

Choices where the paper is silent: λ is additive on the relative scale (1 + λ) so that 0
is the identity and the step size is the same for every σ; the optional LoRA term follows
PEFT's LoRA init (B = 0, A uniform ±1/√in) and scaling alpha/q.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters_zoo.basis import LayerBasis
from adapters_zoo.errors import InvalidConfig
from adapters_zoo.kinds.base import (
    Kind,
    Params,
    SpectralConfig,
    embed_block,
    kaiming_uniform,
    layer_generator,
)


@dataclass
class ScaleConfig(SpectralConfig):
    lora_rank: int = 0  # 0: pure rescaling, no term outside the basis
    lora_alpha: float = 16.0

    def validate(self) -> None:
        super().validate()
        if self.lora_rank < 0:
            raise InvalidConfig(f"lora_rank must be ≥ 0, got {self.lora_rank}")


class ScaleKind(Kind):
    name = "scale"
    paper = "https://arxiv.org/abs/2505.23099"
    Config = ScaleConfig

    diagonal = True  # the core; an optional LoRA term is a separate residual

    def param_shapes(self, out_f, in_f, k, cfg: ScaleConfig):
        a, b = cfg.directions(k)
        shapes = {"lam": (b - a,)}
        if cfg.lora_rank:
            shapes.update(B=(out_f, cfg.lora_rank), A=(cfg.lora_rank, in_f))
        return shapes

    def init_params(self, lb: LayerBasis, cfg: ScaleConfig, layer: str) -> Params:
        a, b = cfg.directions(lb.k)
        params = {"lam": torch.zeros(b - a)}
        if cfg.lora_rank:
            gen = layer_generator(cfg.seed, layer)
            params["B"] = torch.zeros(lb.out_features, cfg.lora_rank)
            params["A"] = kaiming_uniform((cfg.lora_rank, lb.in_features), lb.in_features, gen)
        return params

    def core(self, params: Params, lb: LayerBasis, cfg: ScaleConfig) -> torch.Tensor:
        a, b = cfg.directions(lb.k)
        block = torch.diag(lb.S[a:b] * params["lam"])  # (r, r)
        return embed_block(block, a, lb.k)

    def residual(self, params: Params, lb: LayerBasis, cfg: ScaleConfig):
        if not cfg.lora_rank:
            return None
        return params["B"] * (cfg.lora_alpha / cfg.lora_rank), params["A"]
