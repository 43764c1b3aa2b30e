"""TIES on hand-made cores: trim to density, elect the sign by mass, mean over the agreeing adapters."""

from __future__ import annotations

import pytest
import torch
from fusion_helpers import core_adapter, diag_adapter, toy_basis

from fusion.fuse import fuse

T1, T2, T3 = [4.0, -1.0, 2.0, 0.5], [-3.0, 2.0, 1.0, -0.2], [1.0, 3.0, -6.0, 0.1]


def fused_diag(adapters, weights, basis, method="ties", **params):
    fused = fuse(adapters, weights, basis, method, **params)
    return fused.core("layer0", basis).diagonal()


@pytest.fixture
def basis():
    return toy_basis(k=4)


@pytest.fixture
def tasks(basis):
    return [diag_adapter(basis, t, f"t{i}") for i, t in enumerate((T1, T2, T3))]


def test_trim_elect_and_disjoint_mean_follow_the_paper(basis, tasks):
    # trimmed at density 0.5 (top 2 of 4): [4, 0, 2, 0], [-3, 2, 0, 0], [0, 3, -6, 0]
    # elected signs (Σ = [1, 5, -4, 0]): +, +, -, + ; agreeing means: 4/1, (2+3)/2, -6/1, nothing -> 0
    got = fused_diag(tasks, [1.0, 1.0, 1.0], basis, density=0.5)
    torch.testing.assert_close(got, torch.tensor([4.0, 2.5, -6.0, 0.0]))
    linear = fused_diag(tasks, [1.0, 1.0, 1.0], basis, "linear")
    torch.testing.assert_close(linear, torch.tensor([2.0, 4.0, -3.0, 0.4]))


def test_weights_scale_the_votes_and_the_values(basis, tasks):
    # weighted trimmed: [4, 0, 2, 0], [-6, 4, 0, 0], [0, 3, -6, 0]; Σ = [-2, 7, -4, 0]
    got = fused_diag(tasks, [1.0, 2.0, 1.0], basis, density=0.5)
    torch.testing.assert_close(got, torch.tensor([-6.0, 3.5, -6.0, 0.0]))


def test_scale_is_the_papers_lambda(basis, tasks):
    got = fused_diag(tasks, [1.0, 1.0, 1.0], basis, density=0.5, scale=0.5)
    torch.testing.assert_close(got, torch.tensor([2.0, 1.25, -3.0, 0.0]))


def test_sign_by_mass_or_by_count(basis):
    tasks = [diag_adapter(basis, [5.0, 0, 0, 0]), diag_adapter(basis, [-1.0, 0, 0, 0]),
             diag_adapter(basis, [-1.0, 0, 0, 0])]
    by_mass = fused_diag(tasks, [1, 1, 1], basis, density=1.0)
    by_count = fused_diag(tasks, [1, 1, 1], basis, density=1.0, majority_sign="frequency")
    assert by_mass[0].item() == pytest.approx(5.0) and by_count[0].item() == pytest.approx(-1.0)


def test_trimming_counts_each_cores_own_entries_in_dense_layout_too(basis, tasks):
    # A zero-weight dense adapter forces the k×k layout: diagonal sources must trim the same.
    off = torch.zeros(4, 4)
    off[0, 3] = 9.0
    dense = fuse(tasks + [core_adapter(basis, off)], [1, 1, 1, 0], basis, "ties", density=0.5)
    assert dense.config == {"diagonal": False}
    C = dense.core("layer0", basis)
    torch.testing.assert_close(C, torch.diag(torch.tensor([4.0, 2.5, -6.0, 0.0])))


def test_full_density_and_agreeing_signs_give_the_mean(basis):
    a, b = diag_adapter(basis, [2.0, 4.0, -1.0, 1.0]), diag_adapter(basis, [4.0, 2.0, -3.0, 1.0])
    torch.testing.assert_close(fused_diag([a, b], [1, 1], basis, density=1.0), torch.tensor([3.0, 3.0, -2.0, 1.0]))
