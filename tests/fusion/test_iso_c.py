"""iso_c: the summed core keeps its singular vectors and gets a flat spectrum."""

from __future__ import annotations

import pytest
import torch
from fusion_helpers import core_adapter, diag_adapter, toy_basis

from fusion.fuse import fuse


def test_the_spectrum_of_the_sum_is_flattened_to_its_mean():
    basis = toy_basis(k=6)
    gen = torch.Generator().manual_seed(0)
    a, b = (core_adapter(basis, torch.randn(6, 6, generator=gen)) for _ in range(2))
    summed = 0.5 * a.core("layer0", basis) + 1.5 * b.core("layer0", basis)
    P, s, Qh = torch.linalg.svd(summed)
    fused = fuse([a, b], [0.5, 1.5], basis, "iso_c").core("layer0", basis)
    torch.testing.assert_close(torch.linalg.svdvals(fused), torch.full((6,), s.mean().item()), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, s.mean() * P @ Qh, atol=1e-5, rtol=1e-5)  # same singular vectors
    frob = fuse([a, b], [0.5, 1.5], basis, "iso_c", norm="frobenius").core("layer0", basis)
    assert torch.linalg.matrix_norm(frob).item() == pytest.approx(torch.linalg.matrix_norm(summed).item(), rel=1e-5)
    scaled = fuse([a, b], [0.5, 1.5], basis, "iso_c", scale=2.0).core("layer0", basis)
    torch.testing.assert_close(scaled, 2 * fused)


def test_a_low_rank_sum_is_not_given_new_directions():
    basis = toy_basis(k=4)
    a, b = diag_adapter(basis, [3.0, 1.0, 0.0, 0.0]), diag_adapter(basis, [1.0, 1.0, 0.0, 0.0])
    fused = fuse([a, b], [1.0, 1.0], basis, "iso_c").core("layer0", basis)  # sum diag(4, 2, 0, 0)
    torch.testing.assert_close(fused, torch.diag(torch.tensor([3.0, 3.0, 0.0, 0.0])), atol=1e-5, rtol=1e-5)
