"""geodesic: rotation adapters fused in generator space stay rotations."""

from __future__ import annotations

import torch
from fusion_helpers import diag_adapter, moved, toy_basis

from fusion.fuse import fuse
from fusion.methods.geodesic import fused_rotations

K = 6


def _eye_close(R: torch.Tensor) -> None:
    torch.testing.assert_close(R.T @ R, torch.eye(R.shape[0]), atol=1e-5, rtol=1e-5)
    assert torch.linalg.det(R).item() > 0  # a rotation, not a reflection


def test_fused_rotations_are_orthogonal_and_make_the_core():
    basis = toy_basis(k=K)
    a = moved("rotation", {"rank": 4}, basis, 1)  # directions 0..3
    b = moved("rotation", {"rank": 4, "slice": [2, 6]}, basis, 2)  # directions 2..5: overlapping
    weights = [0.7, 1.3]
    R_U, R_V, c = fused_rotations([a, b], weights, "layer0", K)
    _eye_close(R_U)
    _eye_close(R_V)
    sigma = basis["layer0"].S
    core = fuse([a, b], weights, basis, "geodesic").core("layer0", basis)
    torch.testing.assert_close(core, R_U @ torch.diag(sigma * c) @ R_V.T - torch.diag(sigma), atol=1e-5, rtol=1e-5)


def test_without_rescaling_the_spectrum_is_only_rotated():
    basis = toy_basis(k=K)
    a = moved("rotation", {"rank": 5, "scale": False}, basis, 3)
    b = moved("rotation", {"rank": 5, "scale": False, "slice": [1, 6]}, basis, 4)
    sigma = basis["layer0"].S
    geo = fuse([a, b], [1.0, 1.0], basis, "geodesic").core("layer0", basis) + torch.diag(sigma)
    lin = fuse([a, b], [1.0, 1.0], basis, "linear").core("layer0", basis) + torch.diag(sigma)
    torch.testing.assert_close(torch.linalg.svdvals(geo), sigma, atol=1e-5, rtol=1e-5)  # R_U Σ R_Vᵀ
    assert (torch.linalg.svdvals(lin) - sigma).abs().max() > 0.1  # the plain sum is not a rotation


def test_one_adapter_at_weight_one_is_itself_and_other_kinds_add_linearly():
    basis = toy_basis(k=K)
    rot = moved("rotation", {"rank": 4, "slice": [1, 5]}, basis, 5)
    torch.testing.assert_close(fuse([rot], [1.0], basis, "geodesic").core("layer0", basis),
                               rot.core("layer0", basis), atol=1e-5, rtol=1e-5)
    extra = diag_adapter(basis, [0.5, -0.2, 0.0, 0.1, 0.0, 0.3])
    mixed = fuse([rot, extra], [1.0, 2.0], basis, "geodesic").core("layer0", basis)
    torch.testing.assert_close(mixed, rot.core("layer0", basis) + 2.0 * extra.core("layer0", basis),
                               atol=1e-5, rtol=1e-5)


def test_half_weight_walks_the_cayley_curve():
    basis = toy_basis(k=K)
    rot = moved("rotation", {"rank": 4, "scale": False}, basis, 6)
    R_half, _, _ = fused_rotations([rot], [0.5], "layer0", K)
    R_full, _, _ = fused_rotations([rot], [1.0], "layer0", K)
    _eye_close(R_half)
    assert (R_half - torch.eye(K)).norm() < (R_full - torch.eye(K)).norm()
