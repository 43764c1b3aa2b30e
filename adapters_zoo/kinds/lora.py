"""``lora``: plain LoRA, the baseline (and the kind imported PEFT adapters get).

Paper: LoRA: Low-Rank Adaptation of Large Language Models, https://arxiv.org/abs/2106.09685
``ΔW = (alpha / r) · B A`` with B (out, r) = 0 and A (r, in) uniform ±1/√in, as PEFT
initialises it. It has no core: the whole update is a residual outside the basis. Fusion
keeps it exact by concatenation, or projects it into the basis (``U_kᵀ B A V_k``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters_zoo.basis import LayerBasis
from adapters_zoo.errors import InvalidConfig
from adapters_zoo.kinds.base import Kind, Params, kaiming_uniform, layer_generator


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    seed: int = 0

    def validate(self) -> None:
        if self.rank < 1:
            raise InvalidConfig(f"rank must be ≥ 1, got {self.rank}")


class LoraKind(Kind):
    name = "lora"
    paper = "https://arxiv.org/abs/2106.09685"
    Config = LoraConfig
    has_core = False

    def param_shapes(self, out_f, in_f, k, cfg: LoraConfig):
        return {"B": (out_f, cfg.rank), "A": (cfg.rank, in_f)}

    def init_params(self, lb: LayerBasis, cfg: LoraConfig, layer: str) -> Params:
        gen = layer_generator(cfg.seed, layer)
        return {
            "B": torch.zeros(lb.out_features, cfg.rank),
            "A": kaiming_uniform((cfg.rank, lb.in_features), lb.in_features, gen),
        }

    def residual(self, params: Params, lb: LayerBasis, cfg: LoraConfig):
        return params["B"] * (cfg.alpha / cfg.rank), params["A"]
