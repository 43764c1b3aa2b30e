"""magnitude_prune on hand-made cores: keep each adapter's largest entries, then the weighted sum."""

from __future__ import annotations

import torch
from fusion_helpers import core_adapter, diag_adapter, toy_basis

from fusion.fuse import fuse


def test_keeps_the_top_density_of_each_core_then_sums():
    basis = toy_basis(k=4)
    a = diag_adapter(basis, [4.0, -1.0, 2.0, 0.5])
    b = diag_adapter(basis, [-3.0, 2.0, 1.0, -0.2])
    fused = fuse([a, b], [1.0, 0.5], basis, "magnitude_prune", density=0.5)
    # kept: [4, 0, 2, 0] and [-3, 2, 0, 0]; weighted sum: [4 - 1.5, 1, 2, 0]
    torch.testing.assert_close(fused.core("layer0", basis).diagonal(), torch.tensor([2.5, 1.0, 2.0, 0.0]))


def test_dense_cores_are_pruned_entry_by_entry():
    basis = toy_basis(k=3)
    C = torch.tensor([[1.0, -5.0, 0.2], [0.3, 2.0, -0.1], [4.0, 0.0, 0.5]])  # 8 nonzero entries
    fused = fuse([core_adapter(basis, C)], [1.0], basis, "magnitude_prune", density=0.25)  # keep 2 of 8
    expected = torch.zeros(3, 3)
    expected[0, 1], expected[2, 0] = -5.0, 4.0
    torch.testing.assert_close(fused.core("layer0", basis), expected)
