"""The batched slot math against a per-row loop and against dense ΔW."""

from __future__ import annotations

import pytest
import torch

from adapters_zoo.registry.mixture import Mixture
from fusion.fuse import fuse_cores
from fusion.mixture import MixtureCores, reduce
from serving.backend import (
    LoopBackend,
    Routing,
    RoutingContext,
    SlotGroup,
    TorchBackend,
    allocate_groups,
    shared_input_groups,
)
from serving.slots import NoFreeSlot, SlotTable

LAYER = "model.layers.0.mlp.down_proj"


def table_with(basis, adapters, names, slots=6, residual_slots=3):
    """A one-layer slot table holding ``names`` (adapters) in consecutive slots."""
    lb = basis[LAYER]
    layer = SlotGroup.allocate([(lb.U, lb.V)], slots, residual_slots, 16, torch.float32, torch.device("cpu")).layers[0]
    table = SlotTable({LAYER: layer}, residual_slots, 16)
    placed = {}
    for name in names:
        cores = reduce(Mixture.of([(name, 1.0)]), lambda c: adapters[c.ref], basis)
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
    fast = TorchBackend().apply(y.clone(), x, layer, routing)  # the fast path adds into y in place
    loop = LoopBackend().apply(y.clone(), x, layer, routing)
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
    general = Routing.build(row_slots, table.num_slots, table.diagonal, table.residual_rank, torch.device("cpu"))
    general.all_diagonal = False
    torch.testing.assert_close(TorchBackend().apply(y.clone(), x, layer, routing),
                               TorchBackend().apply(y.clone(), x, layer, general), rtol=1e-6, atol=1e-6)


def test_slot_lru_evicts_least_recent_unpinned_and_keeps_residual_slots(basis, adapters):
    table, _, placed = table_with(basis, adapters, [], slots=3, residual_slots=1)
    mix = {n: reduce(Mixture.of([(n, 1.0)]), lambda c: adapters[c.ref], basis)
           for n in ("scale", "svft", "rotation", "lora")}
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
    table.release(table.acquire(mix["scale"]))  # nothing pinned: a slot is free again


# --------------------------------------------------------------------------- groups: one shrink for q/k/v


QKV = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]


def qkv_group(basis, adapters, names, slots=6, residual_slots=3):
    """q/k/v of layer 0 as one SlotGroup holding ``names`` in consecutive slots (+ their host SlotTable)."""
    group = SlotGroup.allocate([(basis[n].U, basis[n].V) for n in QKV], slots, residual_slots, 16, torch.float32,
                               torch.device("cpu"))
    table = SlotTable(dict(zip(QKV, group.layers)), residual_slots, 16)
    placed = {name: table.acquire(reduce(Mixture.of([(name, 1.0)]), lambda c: adapters[c.ref], basis))
              for name in names}
    return group, table, placed


@pytest.mark.parametrize("names", [["scale", "svft"], ["scale", "rotation", "scale_lora", "lora"], ["scale_q"]])
@pytest.mark.parametrize("tokens", [1, 3])
def test_group_shrink_expand_matches_loop_and_dense_per_layer(basis, adapters, names, tokens):
    group, table, placed = qkv_group(basis, adapters, names)
    gen = torch.Generator().manual_seed(1)
    row_names = [names[i % len(names)] for i in range(5)] + ["base"]
    row_slots = [placed.get(n, -1) for n in row_names]
    routing = Routing.build(row_slots, table.num_slots, table.diagonal, table.residual_rank, torch.device("cpu"))
    x = torch.randn(len(row_slots), tokens, group.V.shape[0], generator=gen)  # (rows, T, in)
    fast, loop = TorchBackend(), LoopBackend()
    h_fast, h_loop = fast.shrink(x, group, routing), loop.shrink(x, group, routing)
    torch.testing.assert_close(h_fast, h_loop, rtol=1e-5, atol=1e-5)
    for name, layer in zip(QKV, group.layers):
        y = torch.randn(len(row_slots), tokens, layer.U.shape[0], generator=gen)
        out = fast.expand(y.clone(), h_fast, x, layer, routing)
        torch.testing.assert_close(out, loop.apply(y.clone(), x, layer, routing), rtol=1e-5, atol=1e-5)
        for i, row in enumerate(row_names):  # each row against its own adapter's dense ΔW of this layer
            adapter = adapters.get(row)
            dense = y[i] if row == "base" or name not in adapter.params else y[i] + x[i] @ adapter.delta(name, basis).T
            torch.testing.assert_close(out[i], dense, rtol=1e-4, atol=1e-4, msg=f"{name}, row {i} ({row})")


def test_group_members_are_views_of_the_group_tables(basis, adapters):
    group, table, placed = qkv_group(basis, adapters, ["rotation"])
    s = placed["rotation"]
    core = reduce(Mixture.of([("rotation", 1.0)]), lambda c: adapters[c.ref], basis).cores[QKV[1]]
    torch.testing.assert_close(group.cores[s, 1], core)
    torch.testing.assert_close(group.diag[s, group.layers[1].columns], torch.diagonal(core))
    torch.testing.assert_close(group.layers[1].V, basis[QKV[1]].V)
    assert not group.cores[table.num_slots].any() and not group.diag[table.num_slots].any(), "the base slot stays 0"


def test_shared_input_groups_pack_siblings_only():
    shapes = {f"m.layers.{i}.{p}": (16, 4) for i in range(2) for p in
              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")}
    shapes["m.layers.1.self_attn.v_proj"] = (16, 2)  # another k: a group of its own
    groups = shared_input_groups(shapes)
    assert ["m.layers.0.self_attn.q_proj", "m.layers.0.self_attn.k_proj", "m.layers.0.self_attn.v_proj"] in groups
    assert ["m.layers.0.mlp.gate_proj", "m.layers.0.mlp.up_proj"] in groups
    assert ["m.layers.0.self_attn.o_proj"] in groups and ["m.layers.1.self_attn.v_proj"] in groups
    assert ["m.layers.1.self_attn.q_proj", "m.layers.1.self_attn.k_proj"] in groups
    assert sorted(n for g in groups for n in g) == sorted(shapes), "every layer exactly once"


def test_context_shares_one_shrink_per_input(basis, adapters):
    group, table, placed = qkv_group(basis, adapters, ["scale"])
    calls = []

    class Counting(TorchBackend):
        def shrink(self, x, group, routing):
            calls.append(x)
            return super().shrink(x, group, routing)

    backend, context = Counting(), RoutingContext()
    context.begin(Routing.build([placed["scale"]], table.num_slots, table.diagonal, table.residual_rank,
                                torch.device("cpu")))
    x, other = torch.randn(1, 1, group.V.shape[0]), torch.randn(1, 1, group.V.shape[0])
    h = context.shrunk(group, x, backend)
    assert context.shrunk(group, x, backend) is h and len(calls) == 1, "siblings reuse the group's shrink"
    assert context.shrunk(group, other, backend) is not h and len(calls) == 2, "another input, another shrink"
    context.end()
    assert context.routing is None and not context._shrunk


# --------------------------------------------------------------------------- per-step metadata


def test_routing_fills_its_buffers_in_place():
    routing = Routing(num_slots=8, capacity=4, device=torch.device("cpu"))
    diagonal, rank = [True] * 8, [0] * 8
    rank[2] = 5
    diagonal[3] = False
    buffer = routing._buffer.data_ptr()
    routing.update([0, -1, 2, 2], diagonal, rank)
    assert routing.index.tolist() == [0, 8, 2, 2] and routing.all_diagonal and not routing.all_base
    (slot, rows, q), = routing.residual_groups
    assert (slot, rows.tolist(), q) == (2, [2, 3], 5)
    routing.update([-1, -1], diagonal, rank)
    assert routing.index.tolist() == [8, 8] and routing.all_base and routing.residual_groups == []
    assert routing._index.tolist() == [8] * 4, "rows past the batch read the zero slot (padding adds nothing)"
    routing.update([3, 1, -1], diagonal, rank)
    assert not routing.all_diagonal and routing.index.tolist() == [3, 1, 8]
    assert routing._buffer.data_ptr() == buffer, "no step allocates new buffers"
    routing.update(list(range(8)) + [-1], diagonal, rank)  # outgrows the capacity: grows once
    assert routing.capacity >= 9 and routing.index.tolist() == list(range(8)) + [8]
    assert [(s, r.tolist()) for s, r, _ in routing.residual_groups] == [(2, [2])]


MIXTURES = {"diag": [("scale", 0.6), ("scale_q", 0.3)], "dense": [("rotation", 0.5), ("svft", 0.25), ("scale", 0.4)],
            "residual": [("scale_lora", 0.7), ("lora", 0.2), ("rotation", 0.3)], "dense_residual": [("additive", 0.5),
                                                                                                  ("scale_lora", 0.5)]}


@pytest.mark.parametrize("names", [["diag"], ["diag", "dense"], ["diag", "residual", "dense_residual"],
                                   ["dense", "residual"]])
def test_packed_linear_mixtures_match_the_fused_ones_the_loop_and_dense(basis, adapters, names):
    """New linear mixtures (summed on packed cores) in one batch, diagonal and dense rows, with residuals:
    the same cores as ``fuse_cores``, and the batched math equals the per-row loop and Σ wₙ ΔWₙ."""
    lb = basis[LAYER]
    layer = SlotGroup.allocate([(lb.U, lb.V)], 6, 3, 16, torch.float32, torch.device("cpu")).layers[0]
    table = SlotTable({LAYER: layer}, 3, 16)
    placed = {}
    for name in names:
        pairs = [(adapters[a], w) for a, w in sorted(MIXTURES[name])]  # the mixture's order
        mixture = reduce(Mixture.of(MIXTURES[name]), lambda c: adapters[c.ref], basis)
        fused = fuse_cores([a for a, _ in pairs], [w for _, w in pairs], basis)
        assert mixture.diagonal == fused.diagonal == (name == "diag")
        for lname in basis.layer_names():
            if lname in fused.cores:
                want = torch.diag(fused.cores[lname]) if fused.diagonal else fused.cores[lname]
                assert torch.equal(mixture.cores[lname], want), (name, lname)
            else:
                assert mixture.cores[lname] is None
        assert set(mixture.residuals) == set(fused.residuals)
        for lname, (B, A) in fused.residuals.items():
            assert torch.equal(mixture.residuals[lname][0], B) and torch.equal(mixture.residuals[lname][1], A)
        one = MixtureCores(name, {LAYER: mixture.cores[LAYER]}, {k: v for k, v in mixture.residuals.items()
                                                                  if k == LAYER}, mixture.diagonal,
                           mixture.residual_rank)
        placed[name] = table.acquire(one)
    gen = torch.Generator().manual_seed(2)
    row_names = [names[i % len(names)] for i in range(5)] + ["base"]
    row_slots = [placed.get(n, -1) for n in row_names]
    x = torch.randn(len(row_slots), 2, layer.V.shape[0], generator=gen)
    y = torch.randn(len(row_slots), 2, layer.U.shape[0], generator=gen)
    routing = Routing.build(row_slots, table.num_slots, table.diagonal, table.residual_rank, torch.device("cpu"))
    assert routing.all_diagonal == (names == ["diag"])
    fast = TorchBackend().apply(y.clone(), x, layer, routing)
    torch.testing.assert_close(fast, LoopBackend().apply(y.clone(), x, layer, routing), rtol=1e-5, atol=1e-5)
    for i, name in enumerate(row_names):
        delta = sum(w * adapters[a].delta(LAYER, basis) for a, w in MIXTURES.get(name, [])
                    if LAYER in adapters[a].params)
        dense = y[i] if name == "base" else y[i] + x[i] @ delta.T
        torch.testing.assert_close(fast[i], dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", [False, True])
def test_a_mixture_is_written_into_a_shared_store_as_it_is_one_layer_at_a_time(basis, adapters, fused):
    """The engine's tables share one core store per k and take a mixture with one copy per store; the slots
    hold exactly what the per-layer writes of separate groups hold, residuals and empty layers included."""
    names = list(basis.layers)
    shared = allocate_groups([[(basis[n].U, basis[n].V)] for n in names], 4, 2, 16, torch.float32,
                             torch.device("cpu"))
    alone = [SlotGroup.allocate([(basis[n].U, basis[n].V)], 4, 2, 16, torch.float32, torch.device("cpu"))
             for n in names]
    stored = SlotTable({n: g.layers[0] for n, g in zip(names, shared)}, 2, 16)
    apart = SlotTable({n: g.layers[0] for n, g in zip(names, alone)}, 2, 16)
    assert len(stored._stores) == 1 and not apart._stores
    method = "ties" if fused else "linear"
    for spec in (MIXTURES["dense_residual"], MIXTURES["diag"], [("lora", 1.0)]):  # slots reused: zeros written
        mixture = reduce(Mixture.of(spec, method), lambda c: adapters[c.ref], basis)
        assert mixture.packed or all(c is None for c in mixture.cores.values())
        if mixture.diagonal:  # a diagonal mixture is held as its diagonals only: (L, k) per group
            assert all(p.dense is None and p.diag.dim() == 2 for _, p in mixture.packed.values())
        for table in (stored, apart):
            table._write(0, mixture)
        for n, g_shared, g_alone in zip(names, shared, alone):
            a, b = g_shared.layers[0], g_alone.layers[0]
            assert torch.equal(a.cores[0], b.cores[0]) and torch.equal(a.diag[0], b.diag[0]), (spec, n)
            assert torch.equal(a.res_B[0], b.res_B[0]) and torch.equal(a.res_A[0], b.res_A[0]), (spec, n)
            want = mixture.cores[n]
            assert torch.equal(a.cores[0], torch.zeros_like(a.cores[0]) if want is None else want), (spec, n)
