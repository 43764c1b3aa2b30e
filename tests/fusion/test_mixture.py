"""A mixture from text to cores: parse, resolve (one registry read per ref), reduce, fuse into an adapter."""

from __future__ import annotations

import pytest
import torch
from fusion_helpers import moved

from adapters_zoo.errors import DeltaOutOfBounds, IncompatibleAdapter, InvalidMixture
from adapters_zoo.registry import Registry
from adapters_zoo.registry.mixture import Mixture, resolve
from fusion.fuse import fuse
from fusion.mixture import fuse_mixture, reduce


@pytest.fixture(scope="module")
def registry(tmp_path_factory, llama_basis, other_basis, mixed):
    reg = Registry(tmp_path_factory.mktemp("mixture-home"))
    reg.add_basis(llama_basis)
    reg.add_basis(other_basis)
    adapters, _ = mixed
    for name, adapter in zip(("scale", "svft", "rotation", "additive", "lora"), adapters):
        reg.add(adapter, name)
    reg.add(adapters[0], "scale")  # scale@2: the same blob again
    reg.add(moved("scale", {"rank": 4}, other_basis, 9), "foreign")
    yield reg
    reg.close()


def test_resolve_reads_each_ref_once_in_the_order_given(registry, count_gets):
    calls = count_gets(registry)
    resolved = resolve(registry, "svft:0.4, scale@1:0.7,rotation")
    assert calls == ["svft", "scale@1", "rotation"]
    assert [(c.ref, c.weight) for c in resolved.given] == [("svft@1", 0.4), ("scale@1", 0.7), ("rotation@1", 1.0)]
    assert resolve(registry, {"scale": 0.5}).pairs == (("scale@2", 0.5),)  # the latest


def test_resolve_refuses_one_version_twice_and_other_bases(registry, llama_basis):
    with pytest.raises(InvalidMixture, match="same adapter"):
        resolve(registry, "scale,scale@2")
    with pytest.raises(InvalidMixture, match="appears twice"):  # caught by the parser, before any read
        resolve(registry, "scale:0.5,scale:0.5")
    with pytest.raises(IncompatibleAdapter, match="a mixture lives in one basis"):
        resolve(registry, "scale,foreign")
    with pytest.raises(IncompatibleAdapter, match="not to the served base"):
        resolve(registry, "foreign", fingerprint=llama_basis.fingerprint)
    with pytest.raises(InvalidMixture, match="negative"):
        resolve(registry, "scale:-0.5")


def test_the_key_is_the_resolved_mixture_not_its_spelling(registry):
    a = resolve(registry, "scale@2:0.7,svft:0.3")
    b = resolve(registry, {"svft@1": 0.3, "scale": 0.7})
    assert a == b and hash(a) == hash(b)
    assert a.pairs == (("scale@2", 0.7), ("svft@1", 0.3))
    assert a.digests == (registry.get("scale@2").sha256, registry.get("svft").sha256)
    assert a != resolve(registry, "scale@1:0.7,svft:0.3"), "another version, another key"
    assert a != resolve(registry, "scale@2:0.7,svft:0.3", "ties", {"density": 0.5})
    assert Mixture().is_base and Mixture().label == "base"


def test_params_are_frozen_json_scalars(registry):
    a = resolve(registry, "scale:0.5,svft:0.5", "ties", {"density": 0.5, "seed": 1})
    assert a.params == (("density", 0.5), ("seed", 1)) and a.fusion_params == {"density": 0.5, "seed": 1}
    assert a == resolve(registry, "svft:0.5,scale:0.5", "ties", {"seed": 1, "density": 0.5}) and hash(a) == hash(a)
    assert Mixture.of([("a", 1.0)], "x", {"keep": [1, 2]}).fusion_params == {"keep": [1, 2]}
    for bad in ({"density": float("nan")}, {"density": {"nested": 1}}, {"density": [1, [2]]}):
        with pytest.raises(InvalidMixture, match="plain JSON"):
            Mixture.of([("a", 1.0)], "ties", bad)


def reduced(pairs, basis):
    """``reduce`` of (Adapter, weight) pairs, as a mixture of components named by their index."""
    mixture = Mixture.of([(str(i), w) for i, (_, w) in enumerate(pairs)])
    return reduce(mixture, lambda c: pairs[int(c.ref)][0], basis)


def test_one_adapter_at_weight_one_is_its_own_cores(llama_basis, mixed):
    for adapter in mixed[0]:
        cores = reduced([(adapter, 1.0)], llama_basis)
        for layer in llama_basis.layer_names():
            own = adapter.core(layer, llama_basis) if layer in adapter.params else None
            if own is None:
                assert cores.cores[layer] is None
            else:
                assert torch.equal(cores.cores[layer], own.float())
            res = adapter.residual(layer, llama_basis) if layer in adapter.params else None
            if res is None:
                assert layer not in cores.residuals
            else:
                assert all(torch.equal(got, want) for got, want in zip(cores.residuals[layer], res))
        if adapter.kind in ("scale", "rotation"):
            assert cores.diagonal == (adapter.kind == "scale"), "scale: the elementwise path; rotation: not"


def test_a_fused_mixture_applies_the_weighted_sum_of_its_sources(llama_basis, mixed):
    adapters, weights = mixed
    cores = reduced(list(zip(adapters, weights)), llama_basis)
    for layer in llama_basis.layer_names():
        lb = llama_basis[layer]
        want = sum(w * a.delta(layer, llama_basis) for a, w in zip(adapters, weights) if layer in a.params)
        got = torch.zeros_like(lb.U @ lb.V.T)
        if cores.cores[layer] is not None:
            got = got + lb.U @ cores.cores[layer] @ lb.V.T
        if layer in cores.residuals:
            got = got + cores.residuals[layer][0] @ cores.residuals[layer][1]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert cores.residual_rank == max(B.shape[1] for B, _ in cores.residuals.values())


def test_reduce_refuses_a_mixture_past_the_delta_bound(llama_basis, mixed):
    with pytest.raises(DeltaOutOfBounds, match="max delta ratio"):
        reduced([(mixed[0][0], 1e6)], llama_basis)
    with pytest.raises(InvalidMixture, match="names no adapter"):
        reduced([], llama_basis)


def test_fuse_mixture_resolves_once_and_names_its_sources(registry, monkeypatch, count_gets, llama_basis):
    calls = count_gets(registry)
    fused, basis, pairs = fuse_mixture(registry, "rotation:0.5,scale@1:0.7", "ties", {"density": 0.5})
    assert calls == ["rotation", "scale@1"]
    assert pairs == [("rotation@1", 0.5), ("scale@1", 0.7)] and basis.fingerprint == llama_basis.fingerprint
    info = fused.meta["fusion"]
    assert info["refs"] == ["rotation@1", "scale@1"] and info["mixture"] == "rotation:0.5,scale@1:0.7"
    assert [s["name"] for s in info["sources"]] == ["rotation@1", "scale@1"]
    monkeypatch.undo()
    expected = fuse([registry.load("rotation"), registry.load("scale@1")], [0.5, 0.7], llama_basis, "ties",
                    density=0.5)
    for layer in expected.params:
        torch.testing.assert_close(fused.delta(layer, basis), expected.delta(layer, llama_basis))
