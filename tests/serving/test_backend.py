"""The batched slot math against a per-row loop and against dense ΔW."""

from __future__ import annotations

import pytest
import torch

from serving.backend import LayerSlots, LoopBackend, Routing, TorchBackend
from serving.slots import MixtureCores, NoFreeSlot, SlotTable

LAYER = "model.layers.0.mlp.down_proj"


def table_with(basis, adapters, names, slots=6, residual_slots=3):
    """A one-layer slot table holding ``names`` (adapters) in consecutive slots."""
    lb = basis[LAYER]
    layer = LayerSlots.allocate(lb.U, lb.V, slots, residual_slots, 16, torch.float32, torch.device("cpu"))
    table = SlotTable({LAYER: layer}, residual_slots, 16)
    placed = {}
    for name in names:
        cores = MixtureCores.from_adapter(name, adapters[name], basis)
        cores = MixtureCores(name, {LAYER: cores.cores[LAYER]},
                             {k: v for k, v in cores.residuals.items() if k == LAYER}, cores.diagonal,
                             cores.residual_rank)
        placed[name] = table.acquire(cores)
    return table, layer, placed


@pytest.mark.parametrize("names", [["scale", "svft"], ["scale", "rotation", "lora", "additive"], ["scale"],
                                   ["scale_lora", "svft"]])
def test_torch_backend_matches_loop_and_dense(basis, adapters, names):
    table, layer, placed = table_with(basis, adapters, names)
    gen = torch.Generator().manual_seed(0)
    row_names = [names[i % len(names)] for i in range(5)] + ["base"]
    row_slots = [placed.get(n, -1) for n in row_names]
    x = torch.randn(len(row_slots), 3, layer.V.shape[0], generator=gen)  # (rows, T, in)
    y = torch.randn(len(row_slots), 3, layer.U.shape[0], generator=gen)
    routing = Routing.build(row_slots, table.num_slots, table.diagonal, table.residual_rank, torch.device("cpu"))
    assert routing.all_diagonal == all(table.diagonal[s] for s in row_slots if s >= 0)
    fast = TorchBackend().apply(y, x, layer, routing)
    loop = LoopBackend().apply(y, x, layer, routing)
    torch.testing.assert_close(fast, loop, rtol=1e-5, atol=1e-5)
    for i, name in enumerate(row_names):  # and both against y + x ΔWᵀ with the adapter's own dense ΔW
        dense = y[i] if name == "base" else y[i] + x[i] @ adapters[name].delta(LAYER, basis).T
        torch.testing.assert_close(fast[i], dense, rtol=1e-4, atol=1e-4)


def test_diagonal_fast_path_equals_general_path(basis, adapters):
    table, layer, placed = table_with(basis, adapters, ["scale", "scale_q"])
    row_slots = [placed["scale"], -1, placed["scale"]]
    x = torch.randn(3, 4, layer.V.shape[0])
    y = torch.zeros(3, 4, layer.U.shape[0])
    routing = Routing.build(row_slots, table.num_slots, table.diagonal, table.residual_rank, torch.device("cpu"))
    assert routing.all_diagonal
    general = Routing(routing.index, False, False, [])
    torch.testing.assert_close(TorchBackend().apply(y, x, layer, routing),
                               TorchBackend().apply(y, x, layer, general), rtol=1e-6, atol=1e-6)


def test_slot_lru_evicts_least_recent_unpinned_and_keeps_residual_slots(basis, adapters):
    table, _, placed = table_with(basis, adapters, [], slots=3, residual_slots=1)
    mix = {n: MixtureCores.from_adapter(n, adapters[n], basis) for n in ("scale", "svft", "rotation", "lora")}
    a = table.acquire(mix["scale"])
    b = table.acquire(mix["svft"])
    assert a != 0 and b != 0, "mixtures without a residual leave the residual slot free"
    r = table.acquire(mix["lora"])
    assert r == 0 and table.residual_rank[0] > 0
    with pytest.raises(NoFreeSlot):  # everything pinned
        table.acquire(mix["rotation"])
    table.release(a)
    assert table.acquire(mix["rotation"]) == a and table.evictions == 1
    assert table.acquire(mix["svft"]) == b and table.hits == 1
    table.release(b)
    table.release(b)
    table.release(r)
    assert table.can_acquire("scale", needs_residual=False)
