"""slices: adapters on disjoint direction slices add without interference; overlaps are caught."""

from __future__ import annotations

import pytest
import torch
from fusion_helpers import core_adapter, moved, toy_basis

from adapters_zoo.errors import InvalidMixture
from adapters_zoo.format import Adapter
from fusion.fuse import fuse


def test_disjoint_slices_fuse_to_the_plain_sum():
    basis = toy_basis(k=8, out_f=10, in_f=9)
    corner = torch.zeros(8, 8)
    corner[6:, 6:] = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    adapters = [moved("scale", {"slice": [0, 3]}, basis, 1), moved("rotation", {"slice": [3, 6]}, basis, 2),
                core_adapter(basis, corner)]
    fused = fuse(adapters, [1.0, 0.5, 2.0], basis, "slices")
    linear = fuse(adapters, [1.0, 0.5, 2.0], basis, "linear")
    torch.testing.assert_close(fused.core("layer0", basis), linear.core("layer0", basis))
    assert fused.meta["fusion"]["notes"] == []


def test_two_additive_adapters_on_disjoint_slices_are_one_adapter_on_their_union(llama_basis):
    a = moved("additive", {"slice": [0, 2]}, llama_basis, 1)
    b = moved("additive", {"slice": [2, 5]}, llama_basis, 2)
    fused = fuse([a, b], [1.0, 1.0], llama_basis, "slices")
    union = {layer: {"A_U": torch.cat([a.params[layer]["A_U"], b.params[layer]["A_U"]], 1),
                     "A_V": torch.cat([a.params[layer]["A_V"], b.params[layer]["A_V"]], 1)} for layer in a.layers}
    one = Adapter("additive", {"slice": [0, 5]}, llama_basis.fingerprint, llama_basis.rank, union)
    for layer in llama_basis.layer_names():
        torch.testing.assert_close(fused.delta(layer, llama_basis), one.delta(layer, llama_basis),
                                   atol=1e-5, rtol=1e-5)


def test_overlapping_slices_are_refused_or_reported():
    basis = toy_basis(k=8, out_f=10, in_f=9)
    a = moved("scale", {"slice": [0, 4]}, basis, 1, name="math")
    b = moved("scale", {"slice": [2, 6]}, basis, 2, name="code")
    with pytest.raises(InvalidMixture, match=r"math, code overlap on layer layer0 \(directions 2\.\.3, 2 shared\)"):
        fuse([a, b], [1.0, 1.0], basis, "slices")
    with pytest.warns(UserWarning, match="overlap"):
        fused = fuse([a, b], [1.0, 1.0], basis, "slices", on_overlap="warn")
    assert "math, code overlap" in fused.meta["fusion"]["notes"][0]
    torch.testing.assert_close(fused.core("layer0", basis), fuse([a, b], [1.0, 1.0], basis).core("layer0", basis))
