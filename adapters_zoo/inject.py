"""Wrap the target ``nn.Linear`` (or GPT-2 ``Conv1D``) modules of a model with an adapter.

    y = base_layer(x) + U_k (C (V_kᵀ x)) + B (A x)

The wrapper holds ``base_layer`` (frozen), the layer's basis as buffers and the kind's
native parameters as ``nn.Parameter``s; the core and residual are rebuilt from them on
every forward, so gradients reach exactly the adapter parameters. Used for training and
for the reference forward the serving fast paths are tested against.
"""

from __future__ import annotations

import torch
from torch import nn

from adapters_zoo.basis import Basis, LayerBasis
from adapters_zoo.errors import IncompatibleAdapter
from adapters_zoo.format import Adapter


class SpectralLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, lb: LayerBasis, adapter: Adapter, layer: str):
        super().__init__()
        self.base_layer = base_layer
        self.layer = layer
        self.kind = adapter.kind_impl
        self.cfg = adapter.cfg
        self.register_buffer("U", lb.U.clone(), persistent=False)  # (out, k)
        self.register_buffer("S", lb.S.clone(), persistent=False)  # (k,)
        self.register_buffer("V", lb.V.clone(), persistent=False)  # (in, k)
        self.adapter_params = nn.ParameterDict(
            {
                name: nn.Parameter(t.clone(), requires_grad=name not in self.kind.frozen)
                for name, t in adapter.params[layer].items()
            }
        )

    def params_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.adapter_params.items())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if torch.is_autocast_enabled(x.device.type):  # the core stays float32 under mixed precision
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self._add_delta(x, y)
        return self._add_delta(x, y)

    def _add_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lb = LayerBasis(self.U, self.S, self.V)
        params = self.params_dict()
        h = x.to(self.U.dtype)
        delta = None
        core = self.kind.core(params, lb, self.cfg)
        if core is not None:
            delta = ((h @ self.V) @ core.T) @ self.U.T  # (…, k) -> (…, k) -> (…, out)
        res = self.kind.residual(params, lb, self.cfg)
        if res is not None:
            B, A = res
            r = (h @ A.T) @ B.T  # (…, q) -> (…, out)
            delta = r if delta is None else delta + r
        return y if delta is None else y + delta.to(y.dtype)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), leaf


def attach(model: nn.Module, adapter: Adapter, basis: Basis) -> list[SpectralLinear]:
    """Replace each target layer of ``model`` by a SpectralLinear holding ``adapter``."""
    adapter.check_against(basis)
    device = next(model.parameters()).device
    wrapped = []
    for layer in adapter.layers:
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            raise IncompatibleAdapter(f"model has no layer {layer!r}") from None
        if isinstance(module, SpectralLinear):
            raise IncompatibleAdapter(f"layer {layer} already holds an adapter; detach it first")
        lb = basis[layer]
        wrapper = SpectralLinear(module, lb, adapter, layer).to(device)
        parent, leaf = _parent(model, layer)
        setattr(parent, leaf, wrapper)
        wrapped.append(wrapper)
    return wrapped


def detach(model: nn.Module) -> int:
    """Put every wrapped layer's base_layer back; returns how many were restored."""
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, SpectralLinear)]
    for name, module in wrapped:
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, module.base_layer)
    return len(wrapped)


def extract(model: nn.Module, template: Adapter) -> Adapter:
    """The adapter currently held by ``model``'s wrappers, as a new Adapter (CPU, detached)."""
    params = {}
    for _, module in model.named_modules():
        if isinstance(module, SpectralLinear):
            params[module.layer] = {n: p.detach().to("cpu").clone() for n, p in module.adapter_params.items()}
    missing = [layer for layer in template.layers if layer not in params]
    if missing:
        raise IncompatibleAdapter(f"model holds no adapter on layer {missing[0]!r}")
    return Adapter(template.kind, dict(template.config), template.base_fingerprint, template.basis_k,
                   {layer: params[layer] for layer in template.layers}, dict(template.meta))


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, SpectralLinear) for p in m.adapter_params.values()
            if p.requires_grad]
