"""Mixtures on the device: a fixed table of slots, kept as an LRU over mixture keys.

A mixture is reduced once (on the host, :func:`fusion.mixture.reduce`) to
:class:`MixtureCores`: per target layer its k×k core and optional residual ``(B, A)``.
:class:`SlotTable` copies it into a free slot of every layer's tables the first time a
batch needs it, and keeps it there until the slot is the least recently used one that no
running request holds (a *pin*). Slots ``0 .. R-1`` also have residual storage; mixtures
without a residual prefer the others, so residual-capable slots stay free for the
mixtures that need them.

The engine keeps reduced mixtures on the host too (a :class:`adapters_zoo.cache.BoundedCache`
bigger than the slot table), so a mixture evicted from the device is copied back, not fused again.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

from adapters_zoo.errors import InvalidMixture
from fusion.mixture import MixtureCores
from serving.backend import CoreStore, LayerSlots

__all__ = ["MixtureCores", "NoFreeSlot", "SlotTable"]


class NoFreeSlot(Exception):
    """Every eligible slot is pinned by a running request (the scheduler waits, never the client)."""


class SlotTable:
    """Key -> slot over preallocated per-layer tables; pinned slots are never evicted."""

    def __init__(self, layers: dict[str, LayerSlots], residual_slots: int, residual_rank: int):
        self.layers = layers
        # k -> (its layers in table order, the one core store they share, their positions in it): a mixture's
        # packed group is written with one copy; layers of a k whose tables are spread over stores go one by one
        self._stores: dict[int, tuple[tuple[str, ...], CoreStore, torch.Tensor]] = {}
        by_k: dict[int, list[str]] = {}
        for name, table in layers.items():
            by_k.setdefault(table.k, []).append(name)
        for k, names in by_k.items():
            stores = {id(layers[n].group.store): layers[n].group.store for n in names}
            if len(stores) == 1:
                positions = torch.tensor([layers[n].position for n in names], device=layers[names[0]].cores.device)
                self._stores[k] = (tuple(names), next(iter(stores.values())), positions)
        first = next(iter(layers.values()))
        self.num_slots = first.num_slots
        self.residual_slots = residual_slots
        self.max_residual_rank = residual_rank
        self.keys: list[Hashable | None] = [None] * self.num_slots
        self.pins = [0] * self.num_slots
        self.diagonal = [True] * self.num_slots  # host copies the router needs without a device sync
        self.residual_rank = [0] * self.num_slots
        self._lru: OrderedDict[Hashable, int] = OrderedDict()  # key -> slot, least recent first
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.on_ready: Callable[[float], None] | None = None  # a new mixture's seconds: reduced + written

    def check_fits(self, mixture: MixtureCores) -> None:
        """Raise InvalidMixture for a mixture no slot of this table can ever hold."""
        if mixture.residual_rank > self.max_residual_rank:
            raise InvalidMixture(
                f"the mixture's residual has rank {mixture.residual_rank}, this server holds at most "
                f"{self.max_residual_rank} per slot; fuse it with project=true to move it into the basis"
            )
        if mixture.residual_rank and self.residual_slots == 0:
            raise InvalidMixture("the mixture has a residual outside the basis and this server has no residual slots")

    def acquire(self, mixture: MixtureCores) -> int:
        """Pin the slot holding ``mixture``, writing it into a free slot on a miss (``mixture`` passed
        ``check_fits`` when it was reduced: ``Engine.prepare``)."""
        slot = self._lru.get(mixture.key)
        if slot is not None:
            self.hits += 1
            self._lru.move_to_end(mixture.key)
            self.pins[slot] += 1
            return slot
        slot = self._victim(needs_residual=mixture.residual_rank > 0)
        old = self.keys[slot]
        if old is not None:
            del self._lru[old]
            self.evictions += 1
        self.misses += 1
        start = time.perf_counter()
        self._write(slot, mixture)
        if self.on_ready is not None and not mixture.ready:  # its first slot: ready for a first decode step
            self.on_ready(mixture.reduce_seconds + time.perf_counter() - start)
        mixture.ready = True
        self.keys[slot] = mixture.key
        self.diagonal[slot] = mixture.diagonal
        self.residual_rank[slot] = mixture.residual_rank
        self._lru[mixture.key] = slot
        self.pins[slot] += 1
        return slot

    def _write(self, slot: int, mixture: MixtureCores) -> None:
        """``mixture``'s cores and residuals into ``slot`` of every layer: one copy per packed group."""
        one_by_one = set(self.layers)
        for k, (names, store, positions) in self._stores.items():
            layers, pack = mixture.packed.get(k, (None, None))
            if pack is not None and (layers is names or layers == names):
                if pack.dense is None:  # diagonal: (L, k), one transfer; the dense tables get diag(d)
                    diag = pack.diag.to(store.cores.device, store.cores.dtype)
                    store.cores[slot].index_fill_(0, positions, 0)
                    store.cores[slot].diagonal(dim1=-2, dim2=-1).index_copy_(0, positions, diag)
                else:
                    cores = pack.dense.to(store.cores.device, store.cores.dtype)  # (L, k, k): one transfer
                    store.cores[slot].index_copy_(0, positions, cores)
                    diag = cores.diagonal(dim1=-2, dim2=-1)
                store.diag[slot].view(-1, k).index_copy_(0, positions, diag)
            elif pack is None and all(mixture.cores.get(n) is None for n in names):
                store.cores[slot].index_fill_(0, positions, 0)
                store.diag[slot].view(-1, k).index_fill_(0, positions, 0)
            else:
                continue
            one_by_one.difference_update(names)
        for name, table in self.layers.items():
            if name in one_by_one:
                table.write(slot, mixture.cores.get(name), mixture.residuals.get(name))
            elif slot < self.residual_slots or name in mixture.residuals:
                table.write_residual(slot, mixture.residuals.get(name))

    def release(self, slot: int) -> None:
        if slot < 0:
            return
        if self.pins[slot] <= 0:
            raise RuntimeError(f"slot {slot} released more often than acquired")
        self.pins[slot] -= 1

    def _victim(self, needs_residual: bool) -> int:
        allowed = range(self.residual_slots) if needs_residual else range(self.num_slots)
        empty = [s for s in allowed if self.keys[s] is None]
        if empty:  # mixtures without a residual take the slots without residual storage first
            return max(empty) if not needs_residual else empty[0]
        for slot in self._lru.values():  # least recently used first
            if slot in allowed and self.pins[slot] == 0 and (needs_residual or slot >= self.residual_slots):
                return slot
        if not needs_residual:
            for slot in self._lru.values():
                if self.pins[slot] == 0:
                    return slot
        raise NoFreeSlot(f"all {len(allowed)} eligible slots are held by running requests")

    @property
    def pinned(self) -> int:
        return sum(1 for p in self.pins if p > 0)

    @property
    def occupied(self) -> int:
        return len(self._lru)
