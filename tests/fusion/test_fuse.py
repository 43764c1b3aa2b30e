"""fuse(): linear is exact (dense ΔW and logits), residuals concatenate or project, provenance, errors."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
from fusion_helpers import add_deltas, core_adapter, diag_adapter, load_model, logits, moved, toy_basis

from adapters_zoo.errors import IncompatibleAdapter, InvalidConfig, InvalidMixture
from adapters_zoo.format import adapter_from_bytes, adapter_to_bytes
from adapters_zoo.inject import attach, detach
from fusion.cores import adapter_cores
from fusion.fuse import fuse
from fusion.methods import METHODS


def dense_sum(adapters, weights, basis, layer):
    return sum(w * a.delta(layer, basis) for a, w in zip(adapters, weights) if layer in a.params)


def test_linear_is_the_weighted_sum_of_the_dense_updates(mixed, llama_basis):
    adapters, weights = mixed
    fused = fuse(adapters, weights, llama_basis)
    assert fused.kind == "core" and fused.config == {"diagonal": False}
    assert fused.layers == llama_basis.layer_names()  # the union, in basis order
    for layer in llama_basis.layer_names():
        torch.testing.assert_close(fused.delta(layer, llama_basis), dense_sum(adapters, weights, llama_basis, layer),
                                   atol=2e-6, rtol=1e-5)


def test_fused_logits_equal_the_model_with_the_weighted_updates_applied(mixed, llama_basis, tiny_llama_dir, ids):
    adapters, weights = mixed
    fused = fuse(adapters, weights, llama_basis)
    model = load_model(tiny_llama_dir)
    base = logits(model, ids)
    attach(model, fused, llama_basis)
    ours = logits(model, ids)
    detach(model)
    add_deltas(model, adapters, weights, llama_basis)
    reference = logits(model, ids)
    assert (reference - base).abs().max() > 1.0  # the mixture visibly moves the logits (|logits| ≲ 6)
    torch.testing.assert_close(ours, reference, atol=5e-4, rtol=1e-4)  # float32 sums in another order


def test_residuals_are_concatenated_exactly_with_weights_on_b(llama_basis):
    a = moved("lora", {"rank": 2}, llama_basis, 1)
    b = moved("lora", {"rank": 3}, llama_basis, 2)
    fused = fuse([a, b], [0.25, 2.0], llama_basis)
    layer = llama_basis.layer_names()[0]
    p = fused.params[layer]
    assert set(p) == {"B", "A"} and p["B"].shape[1] == 5 and p["A"].shape[0] == 5  # rank 2 + 3, no core
    Ba, Aa = a.residual(layer, llama_basis)
    torch.testing.assert_close(p["B"][:, :2], 0.25 * Ba)
    torch.testing.assert_close(p["A"][2:], b.params[layer]["A"])


def test_project_puts_residuals_into_the_core_and_reports_the_energy_lost(llama_basis):
    lora = moved("lora", {"rank": 3}, llama_basis, 7)
    scale = moved("scale", {"rank": 4}, llama_basis, 8)
    fused = fuse([lora, scale], [0.5, 1.0], llama_basis, project=True)
    assert all(set(p) == {"C"} for p in fused.params.values())
    total = lost = 0.0
    for layer in llama_basis.layer_names():
        lb = llama_basis[layer]
        dw = 0.5 * lora.delta(layer, llama_basis)
        inside = lb.U @ lb.U.T @ dw @ lb.V @ lb.V.T  # orthogonal projection onto span(U_k) x span(V_k)
        expected = inside + scale.delta(layer, llama_basis)
        torch.testing.assert_close(fused.delta(layer, llama_basis), expected, atol=1e-5, rtol=1e-4)
        total += float(dw.square().sum())
        lost += float((dw - inside).square().sum())
        assert fused.meta["projection"]["per_layer"][layer] == pytest.approx(
            float((dw - inside).square().sum()) / float(dw.square().sum()), rel=1e-3)
    assert fused.meta["projection"]["energy_lost"] == pytest.approx(lost / total, rel=1e-3)
    assert 0.0 < fused.meta["projection"]["energy_lost"] < 1.0  # a random LoRA is mostly outside the top-8


def test_diagonal_sources_stay_diagonal_when_the_method_works_entrywise(llama_basis):
    a = moved("scale", {"rank": 8}, llama_basis, 1)
    b = moved("svft", {"pattern": "plain"}, llama_basis, 2)
    for method in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "slices"):
        params = {"on_overlap": "warn"} if method == "slices" else {}
        with pytest.warns(UserWarning) if method == "slices" else nullcontext():
            fused = fuse([a, b], [1.0, 0.5], llama_basis, method, **params)
        assert fused.config == {"diagonal": True}, method
        assert all(set(p) == {"c"} and p["c"].shape == (8,) for p in fused.params.values())
    layer = llama_basis.layer_names()[3]
    torch.testing.assert_close(fuse([a, b], [1.0, 0.5], llama_basis).delta(layer, llama_basis),
                               dense_sum([a, b], [1.0, 0.5], llama_basis, layer), atol=2e-6, rtol=1e-5)
    assert fuse([a, b], [1.0, 0.5], llama_basis, "iso_c").config == {"diagonal": False}  # a spectral method
    rot = moved("rotation", {"rank": 4}, llama_basis, 3)
    assert fuse([a, rot], [1.0, 1.0], llama_basis).config == {"diagonal": False}  # one dense source


def test_every_method_handles_a_mixture_of_all_kinds(mixed, llama_basis):
    adapters, weights = mixed
    for name in METHODS:
        params = {"on_overlap": "warn"} if name == "slices" else {}
        with pytest.warns(UserWarning) if name == "slices" else nullcontext():
            fused = fuse(adapters, weights, llama_basis, name, **params)
        fused.check_against(llama_basis)
        assert all(torch.isfinite(t).all() for p in fused.params.values() for t in p.values()), name
        again = adapter_from_bytes(adapter_to_bytes(fused), llama_basis)  # a valid file
        assert again.layers == fused.layers


def test_provenance_is_recorded_in_meta(mixed, llama_basis):
    adapters, weights = mixed
    fused = fuse(adapters, weights, llama_basis, "dare_ties", density=0.4, seed=3)
    info = fused.meta["fusion"]
    assert info["method"] == "dare_ties" and info["paper"] == "https://arxiv.org/abs/2311.03099"
    assert info["params"] == {"density": 0.4, "seed": 3, "majority_sign": "total", "scale": 1.0}
    assert info["weights"] == weights
    assert [s["name"] for s in info["sources"]] == [a.meta["name"] for a in adapters]
    assert [s["kind"] for s in info["sources"]] == ["scale", "svft", "rotation", "additive", "lora"]
    assert info["residuals"] == "concatenated"


def test_cores_are_cached_per_adapter_and_basis(llama_basis):
    a = moved("rotation", {"rank": 4}, llama_basis, 11)
    first = adapter_cores(a, llama_basis)
    assert adapter_cores(a, llama_basis) is first
    copy = adapter_from_bytes(adapter_to_bytes(a))
    assert adapter_cores(copy, llama_basis) is not first
    torch.testing.assert_close(fuse([a], [1.0], llama_basis).delta(a.layers[0], llama_basis),
                               a.delta(a.layers[0], llama_basis), atol=1e-6, rtol=1e-5)


def test_cores_are_held_once_diagonal_ones_as_their_diagonal(llama_basis):
    """A diagonal core is kept as its k values; dense cores share their storage with the packed group;
    the bytes reported are the storages held."""
    for kind, config in (("scale", {"rank": 4}), ("rotation", {"rank": 4})):
        a = moved(kind, config, llama_basis, 12)
        entry = adapter_cores(a, llama_basis, cache=False)
        for layer in a.layers:
            core = a.core(layer, llama_basis)
            torch.testing.assert_close(entry.core(layer), core)
            assert entry.cores[layer].dim() == (1 if kind == "scale" else 2)
        packs = entry.packed(llama_basis)
        one_dense_per_layer = sum(llama_basis[layer].k ** 2 * 4 for layer in a.layers)
        if kind == "scale":
            assert entry.nbytes < one_dense_per_layer / 2
        else:  # every dense core is a view of its pack: the packs are all that is held
            assert entry.nbytes == sum(p.dense.nbytes + p.present.nbytes for p in packs.values())


# --------------------------------------------------------------------------- errors


def test_unknown_method_lists_the_known_ones(llama_basis):
    a = moved("scale", None, llama_basis, 1)
    with pytest.raises(InvalidConfig, match="unknown fusion method 'nope'.*linear.*ties.*geodesic"):
        fuse([a], [1.0], llama_basis, "nope")


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("ties", {"densty": 0.3}, "no parameter densty.*density"),
        ("linear", {"density": 0.3}, "'linear' has no parameter density"),
        ("ties", {"density": 0.0}, "density must be in"),
        ("dare_linear", {"density": 1.5}, "density must be in"),
        ("dare_linear", {"seed": "x"}, "seed must be an integer"),
        ("ties", {"majority_sign": "most"}, "majority_sign must be one of total, frequency"),
        ("iso_c", {"norm": "l1"}, "norm must be one of"),
        ("tsv", {"rank_fraction": 0}, "rank_fraction must be in"),
        ("slices", {"on_overlap": "ignore"}, "on_overlap must be one of"),
        ("ties", {"scale": float("nan")}, "scale must be finite"),
    ],
)
def test_bad_method_parameters_are_named(llama_basis, method, params, message):
    a = moved("scale", None, llama_basis, 1)
    with pytest.raises(InvalidConfig, match=message):
        fuse([a], [1.0], llama_basis, method, **params)


@pytest.mark.parametrize("weights", [[math.nan, 1.0], [1.0, math.inf], [-0.5, 1.0], [1.0], [1.0, "a"], [True, 1.0]])
def test_bad_weights_are_an_invalid_mixture(llama_basis, weights):
    a, b = moved("scale", None, llama_basis, 1), moved("scale", None, llama_basis, 2)
    with pytest.raises(InvalidMixture):
        fuse([a, b], weights, llama_basis)


def test_an_empty_mixture_is_refused(llama_basis):
    with pytest.raises(InvalidMixture, match="empty"):
        fuse([], [], llama_basis)


def test_adapters_of_another_base_or_k_are_incompatible(llama_basis, other_basis):
    ours = moved("scale", None, llama_basis, 1)
    theirs = moved("scale", None, other_basis, 1, name="foreign")
    with pytest.raises(IncompatibleAdapter, match=r"adapter #1 \(foreign\) belongs to base"):
        fuse([ours, theirs], [0.5, 0.5], llama_basis)
    basis4 = toy_basis(k=4)
    with pytest.raises(IncompatibleAdapter, match="k=8, this basis has k=4"):
        fuse([core_adapter(basis4, torch.eye(4)), _with_k(diag_adapter(basis4, [1, 2, 3, 4]), 8)], [1, 1], basis4)


def _with_k(adapter, k):
    adapter.basis_k = k
    return adapter
