"""``core``: an explicit k×k core (+ optional residual) per layer.

What fusion produces and what a projected LoRA import becomes: the kind-free form every
other kind reduces to, ``ΔW = U_k C V_kᵀ + B A``. ``diagonal`` stores only diag(C) (k
values) so fused rescaling adapters stay as small as their sources; layers with a
residual hold ``B`` (out, q) and ``A`` (q, in), q free per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters_zoo.basis import LayerBasis
from adapters_zoo.errors import AdapterFormatError
from adapters_zoo.kinds.base import Kind, Params


@dataclass
class CoreConfig:
    diagonal: bool = False

    def validate(self) -> None:
        pass


class CoreKind(Kind):
    name = "core"
    paper = "https://arxiv.org/abs/2405.19597"  # the U (Σ + M) Vᵀ form, M dense
    Config = CoreConfig

    def param_shapes(self, out_f, in_f, k, cfg: CoreConfig):
        return {"c": (k,)} if cfg.diagonal else {"C": (k, k)}

    def init_params(self, lb: LayerBasis, cfg: CoreConfig, layer: str) -> Params:
        return {"c": torch.zeros(lb.k)} if cfg.diagonal else {"C": torch.zeros(lb.k, lb.k)}

    def core(self, params: Params, lb: LayerBasis, cfg: CoreConfig) -> torch.Tensor | None:
        if cfg.diagonal:
            return torch.diag(params["c"]) if "c" in params else None
        return params.get("C")

    def residual(self, params: Params, lb: LayerBasis, cfg: CoreConfig):
        if "B" in params:
            return params["B"], params["A"]
        return None

    def check_params(self, params: Params, lb: LayerBasis, cfg: CoreConfig, layer: str) -> None:
        # A layer may carry the core, the residual, or both.
        core_name, core_shape = next(iter(self.param_shapes(lb.out_features, lb.in_features, lb.k, cfg).items()))
        allowed = {core_name, "B", "A"}
        extra = sorted(set(params) - allowed)
        if extra or not params:
            raise AdapterFormatError(f"layer {layer}: unexpected tensors {extra or 'none at all'}")
        if core_name in params and tuple(params[core_name].shape) != core_shape:
            raise AdapterFormatError(
                f"layer {layer}: {core_name} has shape {tuple(params[core_name].shape)}, expected {core_shape}"
            )
        if ("B" in params) != ("A" in params):
            raise AdapterFormatError(f"layer {layer}: a residual needs both B and A")
        if "B" in params:
            B, A = params["B"], params["A"]
            if B.dim() != 2 or A.dim() != 2 or B.shape[0] != lb.out_features or A.shape[1] != lb.in_features \
                    or B.shape[1] != A.shape[0]:
                raise AdapterFormatError(
                    f"layer {layer}: residual shapes B{tuple(B.shape)} A{tuple(A.shape)} do not fit "
                    f"({lb.out_features}, q)·(q, {lb.in_features})"
                )

    def count_params(self, out_f, in_f, k, cfg: CoreConfig) -> int:
        return k if cfg.diagonal else k * k
