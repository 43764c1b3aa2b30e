"""Per-adapter cores and residuals, evaluated once and cached for repeated fusions.

Mixtures share adapters: the k×k cores (and residual factors) of an adapter are computed
the first time it is fused against a basis and reused after. ``adapter_cores`` keeps them
in a bounded cache keyed by the objects themselves, dropped when the adapter is garbage
collected, so cores live as long as whoever holds the adapter (the server: its adapter
cache, by content hash). It assumes adapters are not mutated after loading (the registry
and ``load_adapter`` hand out fresh objects; training extracts new ones).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import cached_property

import torch

from adapters_zoo.basis import Basis, LayerBasis
from adapters_zoo.cache import BoundedCache
from adapters_zoo.format import Adapter

Residual = tuple[torch.Tensor, torch.Tensor]  # B (out, q), A (q, in)
MAX_STACKS = 4  # stacked layer groups kept per adapter
CORES_CACHE = 4096  # adapters whose cores ``adapter_cores`` keeps (they die with their adapter anyway)
CORES_CACHE_BYTES = 1 << 30  # and the host memory those cores may take


@dataclass
class AdapterCores:
    cores: dict[str, torch.Tensor | None]  # layer -> C (k, k), or only diag(C) (k,) where ``diagonal``
    residuals: dict[str, Residual | None]  # layer -> (B, A)
    diagonal: dict[str, bool]  # layer -> the core has no off-diagonal entry (and is held as its diagonal)
    projected: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> U_kᵀ B A V_k (k, k), lazily
    stacks: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # see ``stack``
    packs: dict[int, Pack] | None = None  # see ``packed``

    @property
    def nbytes(self) -> int:
        """Host memory of every tensor held: cores, residuals and what was derived from them (a storage
        shared by views, the dense cores and their pack, counted once)."""
        tensors = [c for c in self.cores.values() if c is not None]
        tensors += [t for r in self.residuals.values() if r is not None for t in r]
        tensors += list(self.projected.values()) + [t for pair in self.stacks.values() for t in pair]
        for pack in (self.packs or {}).values():
            tensors += [t for t in (pack.dense, pack.diag, pack.present) if t is not None]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())

    @cached_property
    def all_diagonal(self) -> bool:
        return all(self.diagonal.values())

    @property
    def has_residual(self) -> bool:
        return bool(self.layers_with_residual)

    @cached_property
    def layers_with_core(self) -> frozenset[str]:
        return frozenset(layer for layer, c in self.cores.items() if c is not None)

    @cached_property
    def layers_with_residual(self) -> frozenset[str]:
        return frozenset(layer for layer, r in self.residuals.items() if r is not None)

    def core_layers(self, project: bool) -> frozenset[str]:
        """Layers where this adapter has a core (or, projecting, a residual that becomes one)."""
        return self.layers_with_core | self.layers_with_residual if project else self.layers_with_core

    def projected_residual(self, layer: str, lb: LayerBasis) -> torch.Tensor | None:
        res = self.residuals.get(layer)
        if res is None:
            return None
        if layer not in self.projected:
            self.projected[layer] = project_residual(res[0], res[1], lb)[0]
        return self.projected[layer]

    def core(self, layer: str) -> torch.Tensor | None:
        """C (k, k) of ``layer``, or None."""
        core = self.cores.get(layer)
        return torch.diag(core) if core is not None and self.diagonal[layer] else core

    def layer_core(self, layer: str, lb: LayerBasis, project: bool) -> torch.Tensor | None:
        core = self.core(layer)
        if project:
            proj = self.projected_residual(layer, lb)
            if proj is not None:
                core = proj if core is None else core + proj
        return core

    def stack(self, layers: tuple[str, ...], basis: Basis, project: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(cores (L, k, k), present (L,) bool) on ``layers`` (one k), zeros where absent; cached.

        A server fuses the same adapters over the same layers mixture after mixture, so the
        stacked tensor is kept for the last few layer groups asked for.
        """
        key = (layers, project)
        if key not in self.stacks:
            lb = basis[layers[0]]
            zero = torch.zeros(lb.k, lb.k, dtype=lb.U.dtype, device=lb.U.device)
            cores = [self.layer_core(layer, basis[layer], project) for layer in layers]
            present = torch.tensor([c is not None for c in cores], device=zero.device)
            if len(self.stacks) >= MAX_STACKS:
                self.stacks.pop(next(iter(self.stacks)))
            self.stacks[key] = (torch.stack([zero if c is None else c for c in cores]), present)
        return self.stacks[key]


    def packed(self, basis: Basis) -> dict[int, Pack]:
        """Every core of the adapter stacked per group of the basis's layers (``layer_groups``),
        zeros where it has none: a linear mixture is then one weighted add per group and source.
        Computed once (the entry is cached per adapter and basis); the dense cores become views of it."""
        if self.packs is None:
            packs = {}
            for k, layers in layer_groups(basis).items():
                lb = basis[layers[0]]
                present = torch.tensor([self.cores.get(layer) is not None for layer in layers])
                if self.all_diagonal:
                    zero = torch.zeros(k, dtype=lb.U.dtype, device=lb.U.device)
                    diag = torch.stack([zero if self.cores.get(layer) is None else self.cores[layer]
                                        for layer in layers])
                    packs[k] = Pack(None, diag, present)
                else:
                    zero = torch.zeros(k, k, dtype=lb.U.dtype, device=lb.U.device)
                    dense = [self.core(layer) for layer in layers]
                    packs[k] = Pack(torch.stack([zero if c is None else c for c in dense]), None, present)
                    for layer, view in zip(layers, packs[k].dense.unbind(0)):
                        if self.cores.get(layer) is not None and not self.diagonal[layer]:
                            self.cores[layer] = view  # one copy of each dense core
            self.packs = packs
        return self.packs


@dataclass
class Pack:
    """One adapter's cores on one group of layers: dense (L, k, k), or only their diagonals (L, k)
    when every core of the adapter is diagonal; ``present`` (L,) marks the layers it has a core on."""

    dense: torch.Tensor | None
    diag: torch.Tensor | None
    present: torch.Tensor

    def as_dense(self) -> torch.Tensor:
        return torch.diag_embed(self.diag) if self.dense is None else self.dense


def layer_groups(basis: Basis) -> dict[int, tuple[str, ...]]:
    """The basis's layers grouped by k, each group in the basis's order (cached per basis)."""
    hit = _GROUPS.get(id(basis))
    if hit is None or hit[0]() is not basis:
        groups: dict[int, list[str]] = {}
        for name, lb in basis.layers.items():
            groups.setdefault(lb.k, []).append(name)
        hit = (weakref.ref(basis), {k: tuple(layers) for k, layers in groups.items()})
        _GROUPS[id(basis)] = hit
        weakref.finalize(basis, _GROUPS.pop, id(basis), None)
    return hit[1]


_GROUPS: dict[int, tuple[weakref.ref, dict[int, tuple[str, ...]]]] = {}


_CACHE: BoundedCache[tuple[int, int], tuple[weakref.ref, weakref.ref, AdapterCores]] = BoundedCache(
    CORES_CACHE, CORES_CACHE_BYTES, sizeof=lambda hit: hit[2].nbytes)


def _evaluate(adapter: Adapter, basis: Basis) -> AdapterCores:
    cores, residuals, diagonal = {}, {}, {}
    with torch.no_grad():
        for layer, params in adapter.params.items():
            lb = basis[layer]
            on_device = {n: t.to(lb.U.device) for n, t in params.items()}
            core = adapter.kind_impl.core(on_device, lb, adapter.cfg)
            res = adapter.kind_impl.residual(on_device, lb, adapter.cfg)
            residuals[layer] = None if res is None else (res[0].to(lb.U.dtype), res[1].to(lb.U.dtype))
            diagonal[layer] = core is None or not bool((core - torch.diag(core.diagonal())).any())
            if core is not None:  # a diagonal core is held as its k values, not k²
                core = (core.diagonal().clone() if diagonal[layer] else core).to(lb.U.dtype)
            cores[layer] = core
    return AdapterCores(cores, residuals, diagonal)


def adapter_cores(adapter: Adapter, basis: Basis, cache: bool = True) -> AdapterCores:
    """The adapter's cores and residuals on ``basis`` (checked against it on first use)."""
    key = (id(adapter), id(basis))
    hit = _CACHE.get(key) if cache else None
    if hit is not None and hit[0]() is adapter and hit[1]() is basis:
        return hit[2]
    adapter.check_against(basis)
    entry = _evaluate(adapter, basis)
    if cache:
        _CACHE.put(key, (weakref.ref(adapter), weakref.ref(basis), entry))
        weakref.finalize(adapter, _CACHE.pop, key)
    return entry


def clear_cache() -> None:
    _CACHE.clear()


def residual_energy(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B A‖_F² without forming B A: Σ (BᵀB) ⊙ (A Aᵀ), two q×q matrices."""
    return float(((B.T @ B) * (A @ A.T)).sum())


def project_residual(B: torch.Tensor, A: torch.Tensor, lb: LayerBasis) -> tuple[torch.Tensor, float, float]:
    """(U_kᵀ B A V_k (k, k), ‖B A‖_F², the part of it lost): the residual's part inside the basis."""
    core = (lb.U.T @ B) @ (A @ lb.V)  # (k, q) @ (q, k)
    energy = residual_energy(B, A)
    lost = max(0.0, energy - float(core.square().sum()))  # U_k, V_k orthonormal: kept + lost = total
    return core, energy, lost
