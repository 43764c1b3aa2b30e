"""A resolved mixture reduced to what serves it, or fused into a new adapter.

    mixture = resolve(registry, "math:0.7,code@2:0.3", "ties", {"density": 0.5})  # adapters_zoo.registry.mixture
    cores   = reduce(mixture, lambda c: registry.load_record(c.record), basis)     # MixtureCores
    fused   = fuse_mixture(registry, "math:0.7,code@2:0.3", "ties")                # a new ``core`` adapter

``reduce`` is the one reduction (the server, the vLLM bridge, ``specfuse fuse``): a single adapter at
weight 1 (linear, no params) is its own mixture, exactly; any other mixture is combined
by its fusion method on k×k cores (:func:`fusion.fuse.fuse_cores`). The result holds the
cores of each group of same-k layers stacked (only their diagonals when every core is
diagonal; per layer, a k×k core or None where the mixture leaves the layer alone, built on
first use) and an optional residual ``(B, A)`` per layer outside the basis, on the host in
float32; a mixture
whose change to a layer would blow the model's numbers up is refused here
(DeltaOutOfBounds, a 400), before it reaches a device.

``fuse_mixture`` is the offline path (``specfuse fuse``, ``POST /v1/fuse``): the mixture
resolved once and fused, in the same order, into a ``core`` adapter whose ``meta["fusion"]``
names its sources by name@version.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from adapters_zoo.basis import Basis
from adapters_zoo.errors import InvalidMixture
from adapters_zoo.format import MAX_DELTA_RATIO, Adapter, check_delta, core_adapter
from adapters_zoo.registry.mixture import MAX_MIXTURE, Component, Mixture, format_pairs, resolve
from fusion.cores import Pack, adapter_cores, layer_groups
from fusion.fuse import _concat_residual, fuse_cores
from fusion.methods.linear import weighted_sum


class MixtureCores:
    """One mixture as the slot tables hold it (host, float32).

    ``packed`` (k -> (the basis's layers of that k, their cores as a :class:`fusion.cores.Pack`)) is what
    the reductions produce and a slot table writes, one copy per group; a diagonal mixture keeps only
    the diagonals (L, k). ``cores`` (layer -> C (k, k), None where the mixture has no core) is the
    per-layer view of it, built on first use (the serving path never needs it); ``cores`` given
    directly (no packs) is used as it is.
    """

    def __init__(self, key: Mixture, cores: dict[str, torch.Tensor | None] | None,
                 residuals: dict[str, tuple[torch.Tensor, torch.Tensor]], diagonal: bool, residual_rank: int,
                 packed: dict[int, tuple[tuple[str, ...], Pack]] | None = None, layers: tuple[str, ...] = ()):
        self.key = key
        self.residuals = residuals  # layer -> (B (out, q), A (q, in))
        self.diagonal = diagonal  # every core is diagonal: the elementwise path serves it
        self.residual_rank = residual_rank  # the largest q over layers; 0 = no residual anywhere
        self.packed = packed or {}  # groups without any core are left out
        self._layers = layers  # every layer of the basis, for ``cores``
        self._cores = cores
        self.reduce_seconds = 0.0  # the time ``reduce`` took (the host's part of a new mixture's readiness)
        self.ready = False  # written into a device slot once already (serving.slots)

    @property
    def cores(self) -> dict[str, torch.Tensor | None]:
        if self._cores is None:
            cores: dict[str, torch.Tensor | None] = dict.fromkeys(self._layers)
            for layers, pack in self.packed.values():
                for layer, core, has in zip(layers, pack.as_dense().unbind(0), pack.present.tolist()):
                    cores[layer] = core if has else None
            self._cores = cores
        return self._cores

    @property
    def nbytes(self) -> int:
        """Host memory of the cores and residuals (the packs, and any core outside them)."""
        in_packs = {layer for layers, _ in self.packed.values() for layer in layers}
        tensors = [p.dense if p.dense is not None else p.diag for _, p in self.packed.values()]
        tensors += [t for r in self.residuals.values() for t in r]
        if self._cores is not None:
            tensors += [c for layer, c in self._cores.items() if c is not None and layer not in in_packs]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to_adapter(self, basis: Basis) -> Adapter:
        """The mixture as a ``core`` adapter (for writers that take adapters, e.g. the PEFT export)."""
        return core_adapter(basis, self.cores, self.residuals)


def mixture_label(mixture: MixtureCores | None) -> str:
    """How logs, headers and errors name a reduced mixture (``base`` for None)."""
    return "base" if mixture is None else mixture.key.label


def _host(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32)


AdapterLoader = Callable[[Component], Adapter]  # a mixture's component -> its adapter


def reduce(mixture: Mixture, load: AdapterLoader, basis: Basis) -> MixtureCores:
    """``mixture`` (Σ wₙ adapterₙ, combined by its method) as per-layer cores and residuals.

    Weights are taken as given (checked where the mixture was parsed); every adapter, in the
    mixture's order, is checked against ``basis`` when its cores are first evaluated. A plain
    sum is summed on every adapter's packed cores (``AdapterCores.packed``: one weighted add
    per layer group and source, no per-layer work); other methods fuse
    (:func:`fusion.fuse.fuse_cores`). The cores carry their diagonal flag from the sources and
    the method.
    """
    if mixture.is_base:
        raise InvalidMixture("the mixture names no adapter")
    start = time.perf_counter()
    adapters = [load(c) for c in mixture.components]
    if mixture.is_plain_sum:
        cores = _linear(adapters, mixture.weights, basis, mixture)
    else:
        cores = _fused(adapters, mixture.weights, basis, mixture)
    cores.reduce_seconds = time.perf_counter() - start
    return cores


def _fused(adapters: Sequence[Adapter], weights: list[float], basis: Basis, key: Mixture) -> MixtureCores:
    """The method's fusion (:func:`fusion.fuse.fuse_cores`), packed per layer group and screened against
    the delta bound on each group at once, as ``_linear`` does."""
    fused = fuse_cores(list(adapters), weights, basis, key.method, params=key.fusion_params)
    residuals = {layer: (_host(r[0]), _host(r[1])) for layer, r in fused.residuals.items() if r is not None}
    packed: dict[int, tuple[tuple[str, ...], Pack]] = {}
    suspects: list[str] = []
    for k, layers in layer_groups(basis).items():
        group = [fused.cores.get(layer) for layer in layers]
        if all(c is None for c in group):
            continue
        zero = torch.zeros(k) if fused.diagonal else torch.zeros(k, k)
        stacked = torch.stack([zero if c is None else _host(c) for c in group])  # (L, k) | (L, k, k)
        suspects += _suspects(stacked, basis, k, layers)
        present = torch.tensor([c is not None for c in group])
        packed[k] = (layers, Pack(None, stacked, present) if fused.diagonal else Pack(stacked, None, present))
    return _checked(basis, key, residuals, fused.diagonal, packed, suspects)


def _suspects(stacked: torch.Tensor, basis: Basis, k: int, layers: tuple[str, ...]) -> list[str]:
    """The layers of a group whose cores (L, k) | (L, k, k) may pass the delta bound: a float32 screen
    (NaN fails it too); ``check_delta`` decides them exactly."""
    norms = torch.linalg.vector_norm(stacked, dim=tuple(range(1, stacked.dim())))
    return [layers[i] for i in (~(norms <= _bounds(basis, k, layers))).nonzero().flatten().tolist()]


def _checked(basis: Basis, key: Mixture, residuals: dict, diagonal: bool, packed: dict,
             suspects: list[str]) -> MixtureCores:
    """The mixture, once its every suspect layer and every residual layer passed the exact delta bound: a
    mixture that would blow the numbers up is a 400, not NaN."""
    rank = max((B.shape[1] for B, _ in residuals.values()), default=0)
    mixture = MixtureCores(key, None, residuals, diagonal, rank, packed, basis.layer_names())
    if suspects or residuals:
        cores = mixture.cores
        for layer in sorted({*suspects, *residuals}, key=list(basis.layers).index):
            check_delta(layer, cores[layer], residuals.get(layer), basis[layer])
    return mixture


def _linear(adapters: Sequence[Adapter], weights: list[float], basis: Basis, key: Mixture) -> MixtureCores:
    """Σ wₙ Cₙ on packed cores: per layer group one add per source, the delta bound checked on
    the whole group at once; residuals concatenated on the layers that have one."""
    entries = [adapter_cores(a, basis) for a in adapters]
    diagonal = all(e.all_diagonal for e in entries)
    residuals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if len(adapters) == 1 and weights[0] == 1.0:  # one adapter at weight 1: it is its own mixture, exactly
        res = entries[0].residuals
        residuals = {layer: (_host(r[0]), _host(r[1])) for layer, r in res.items() if r is not None}
    else:
        for layer in sorted(set().union(*(e.layers_with_residual for e in entries)), key=list(basis.layers).index):
            B, A = _concat_residual(entries, weights, layer)
            residuals[layer] = (_host(B).contiguous(), _host(A).contiguous())
    packed: dict[int, tuple[tuple[str, ...], Pack]] = {}
    suspects: list[str] = []
    for k, layers in layer_groups(basis).items():
        packs = [e.packed(basis)[k] for e in entries]
        present = packs[0].present
        for p in packs[1:]:
            present = present | p.present
        if not bool(present.any()):
            continue
        xs = [p.diag for p in packs] if diagonal else [p.as_dense() for p in packs]
        summed = weighted_sum(xs, torch.tensor(weights, dtype=xs[0].dtype, device=xs[0].device))
        summed = summed.detach().to("cpu", torch.float32)
        suspects += _suspects(summed, basis, k, layers)
        packed[k] = (layers, Pack(None, summed, present) if diagonal else Pack(summed, None, present))
    return _checked(basis, key, residuals, diagonal, packed, suspects)


_BOUNDS: dict[tuple[int, int], tuple[weakref.ref, torch.Tensor]] = {}
SCREEN_MARGIN = 1e-3  # layers this close to the bound are checked in float64


def _bounds(basis: Basis, k: int, layers: tuple[str, ...]) -> torch.Tensor:
    """format.check_delta's bound of every layer of a group (L,), less a margin for float32 rounding; cached
    per basis."""
    hit = _BOUNDS.get((id(basis), k))
    if hit is None or hit[0]() is not basis:
        norms = [float(torch.linalg.vector_norm(basis[layer].S.double())) for layer in layers]
        hit = (weakref.ref(basis), (1 - SCREEN_MARGIN) * MAX_DELTA_RATIO * torch.tensor(norms))
        _BOUNDS[(id(basis), k)] = hit
        weakref.finalize(basis, _BOUNDS.pop, (id(basis), k), None)
    return hit[1]


def fuse_mixture(registry, mixture: str | Mapping[str, float], method: str = "linear",
                 params: Mapping[str, Any] | None = None, project: bool = False, *, fingerprint: str | None = None,
                 max_entries: int = MAX_MIXTURE) -> tuple[Adapter, Basis, list[tuple[str, float]]]:
    """(fused ``core`` adapter, its basis, [(name@version, weight)] as given) of a registry mixture.

    The cores are those the server serves for the same mixture (fused in the mixture's order,
    whatever order it was typed in); ``meta["fusion"]`` lists the sources in the order given.
    """
    resolved = resolve(registry, mixture, method, params, fingerprint=fingerprint, max_entries=max_entries)
    basis = registry.basis(resolved.components[0].record.base_fingerprint)
    adapters = [registry.load_record(c.record) for c in resolved.components]
    fused = fuse_cores(adapters, resolved.weights, basis, resolved.method, project, resolved.fusion_params)
    info = fused.meta["fusion"]
    at = {c.ref: i for i, c in enumerate(resolved.components)}
    typed = [at[c.ref] for c in resolved.given]  # the mixture's order -> the order given
    info["sources"] = [info["sources"][i] for i in typed]
    info["weights"] = [info["weights"][i] for i in typed]
    refs = [c.ref for c in resolved.given]
    for source, ref in zip(info["sources"], refs):
        source["name"] = ref
    info["refs"] = refs
    info["mixture"] = mixture if isinstance(mixture, str) else format_pairs(mixture.items())
    return fused.to_adapter(basis), basis, [(c.ref, c.weight) for c in resolved.given]
