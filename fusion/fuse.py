"""``fuse``: N adapters + weights -> one ``core`` adapter, by a named method, in the shared basis.

Every kind reduces to ``ΔW = U_k C V_kᵀ + B A``, so fusion is arithmetic on k×k cores:

    cores     stacked per group of layers with the same k: (L, N, k, k), or (L, N, k)
              diagonals when every core is diagonal and the method works entry by entry
    method    combine(cores, w) -> (L, k, k) | (L, k)            (fusion/methods/)
    residual  exact by concatenation: B = [w₁B₁ | w₂B₂ | …], A = [A₁; A₂; …]
              or, with ``project=True``, U_kᵀ Bₙ Aₙ V_k added to each adapter's core before
              the method runs, the energy of the mixture's residual lost to it reported

No out×in matrix is formed (except the concatenated residual factors), so fusing is
milliseconds for a 7B-shaped model; the server calls it once per distinct mixture.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from adapters_zoo.basis import Basis
from adapters_zoo.errors import IncompatibleAdapter, InvalidMixture
from adapters_zoo.format import Adapter, core_adapter
from fusion.cores import AdapterCores, adapter_cores, residual_energy
from fusion.methods import FusionContext, get_method


def check_weights(adapters: list[Adapter], weights: list[float]) -> list[float]:
    if not adapters:
        raise InvalidMixture("empty mixture: fusion needs at least one adapter")
    if len(weights) != len(adapters):
        raise InvalidMixture(f"{len(adapters)} adapters but {len(weights)} weights")
    out = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise InvalidMixture(f"weight #{i} must be a number, got {w!r}")
        w = float(w)
        if not math.isfinite(w) or w < 0:
            raise InvalidMixture(f"weight #{i} of {_label(adapters[i], i)} must be finite and ≥ 0, got {w}")
        out.append(w)
    return out


def check_same_basis(adapters: list[Adapter], basis: Basis) -> None:
    for i, a in enumerate(adapters):
        if a.base_fingerprint != basis.fingerprint:
            raise IncompatibleAdapter(
                f"{_label(a, i)} belongs to base {a.base_fingerprint}, not to this basis ({basis.fingerprint}); "
                "adapters of different base models cannot be fused"
            )
        if str(a.basis_k) != str(basis.rank):
            raise IncompatibleAdapter(f"{_label(a, i)} expects a basis of k={a.basis_k}, this basis has k={basis.rank}")


def _label(adapter: Adapter, i: int) -> str:
    name = adapter.meta.get("name")
    return f"adapter #{i} ({name})" if name else f"adapter #{i}"


def _concat_residual(entries: list[AdapterCores], weights: list[float], layer: str):
    parts = [(w * e.residuals[layer][0], e.residuals[layer][1]) for e, w in zip(entries, weights)
             if e.has_residual and e.residuals.get(layer) is not None]
    if not parts:
        return None
    return torch.cat([b for b, _ in parts], dim=1), torch.cat([a for _, a in parts], dim=0)  # (out, Q), (Q, in)


def _projection_report(entries: list[AdapterCores], weights: list[float], layers: list[str], basis: Basis):
    """Energy of the mixture's residual Σ wₙ Bₙ Aₙ, and the share lost by projecting it into the basis."""
    per_layer, total, lost = {}, 0.0, 0.0
    for layer in layers:
        res = _concat_residual(entries, weights, layer)
        if res is None:
            continue
        B, A = res
        energy = residual_energy(B, A)
        kept = sum(w * e.projected_residual(layer, basis[layer]) for e, w in zip(entries, weights)
                   if e.residuals.get(layer) is not None)
        layer_lost = max(0.0, energy - float(kept.square().sum()))
        per_layer[layer] = layer_lost / energy if energy > 0 else 0.0
        total, lost = total + energy, lost + layer_lost
    return {"energy_lost": lost / total if total > 0 else 0.0, "residual_energy": total, "per_layer": per_layer}


def fuse(
    adapters: list[Adapter],
    weights: list[float],
    basis: Basis,
    method: str = "linear",
    project: bool = False,
    **params: Any,
) -> Adapter:
    """One ``core`` adapter that applies the mixture Σ wₙ adapterₙ as ``method`` combines them.

    ``params`` are the method's (density, seed, scale, …), validated by name. The result's
    ``meta["fusion"]`` records sources, weights, method and parameters; with ``project`` its
    ``meta["projection"]`` holds the share of residual energy lost. Tensors are on the
    basis's device.
    """
    weights = check_weights(adapters, weights)
    check_same_basis(adapters, basis)
    return fuse_cores(adapters, weights, basis, method, project, params).to_adapter(basis)


@dataclass
class FusedCores:
    """A fused mixture before it is packed as an adapter: per layer a core and the residual kept outside."""

    layers: list[str]  # the layers some source touches, in the basis's order
    cores: dict[str, torch.Tensor]  # layer -> C (k, k), or its diagonal (k,) when ``diagonal``
    residuals: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (B (out, Q), A (Q, in)); none with project
    diagonal: bool
    meta: dict[str, Any]  # "fusion": sources, weights, method, params, notes; "projection" with project

    def to_adapter(self, basis: Basis) -> Adapter:
        return core_adapter(basis, self.cores, self.residuals, self.diagonal, self.meta)


def fuse_cores(
    adapters: list[Adapter],
    weights: list[float],
    basis: Basis,
    method: str = "linear",
    project: bool = False,
    params: dict[str, Any] | None = None,
) -> FusedCores:
    """``fuse`` without its input checks, for weights checked where the mixture was parsed.

    Each adapter is checked against ``basis`` once, when its cores are first evaluated
    (``fusion.cores.adapter_cores``); the method's ``params`` are validated by name here.
    """
    impl = get_method(method)
    p = impl.params(params or {})
    entries = [adapter_cores(a, basis) for a in adapters]

    touched = set().union(*(a.params for a in adapters))
    layers = [name for name in basis.layer_names() if name in touched]
    with_core = set().union(*(e.core_layers(project) for e in entries))
    diagonal = impl.elementwise and all(e.all_diagonal and not (project and e.has_residual) for e in entries)
    groups: dict[int, list[str]] = defaultdict(list)
    for layer in layers:
        if layer in with_core:
            groups[basis[layer].k].append(layer)

    fused: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    for group in groups.values():
        stacks = [e.stack(tuple(group), basis, project) for e in entries]
        stacked = torch.stack([c for c, _ in stacks], dim=1)  # (L, N, k, k)
        present = torch.stack([mask for _, mask in stacks], dim=1)  # (L, N)
        L, N, k, _ = stacked.shape
        w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
        ctx = FusionContext(group, adapters, basis, present, diagonal, notes)
        if not impl.elementwise:
            out = impl.combine(stacked, w, p, ctx)  # (L, k, k)
        elif diagonal:
            out = impl.combine(stacked.diagonal(dim1=-2, dim2=-1), w, p, ctx)  # (L, N, k) -> (L, k)
        else:
            out = impl.combine(stacked.reshape(L, N, k * k), w, p, ctx).reshape(L, k, k)
        fused.update((layer, out[i].clone()) for i, layer in enumerate(group))  # own storage, not views

    has_residual = any(e.has_residual for e in entries)
    residuals = {}
    if not project and has_residual:
        for layer in layers:
            res = _concat_residual(entries, weights, layer)
            if res is not None:
                residuals[layer] = (res[0].contiguous(), res[1].contiguous())

    meta: dict[str, Any] = {
        "fusion": {
            "method": impl.name,
            "paper": impl.paper,
            "params": impl.params_dict(p),
            "weights": list(weights),
            "sources": [
                {"name": a.meta.get("name"), "kind": a.kind, "layers": len(a.params)} for a in adapters
            ],
            "residuals": ("projected" if project else "concatenated") if has_residual else "none",
            "notes": notes,
        }
    }
    if project and has_residual:
        meta["projection"] = _projection_report(entries, weights, layers, basis)
    return FusedCores(layers, fused, residuals, diagonal, meta)
