"""DARE on hand-made cores: random drop with probability 1 − density, survivors rescaled, seeded."""

from __future__ import annotations

import pytest
import torch
from fusion_helpers import core_adapter, diag_adapter, toy_basis

from fusion.fuse import fuse

K = 32


@pytest.fixture
def basis():
    return toy_basis(k=K, out_f=40, in_f=36)


def test_survivors_are_rescaled_and_the_expectation_is_kept(basis):
    ones = core_adapter(basis, torch.full((K, K), 2.0))
    C = fuse([ones], [1.0], basis, "dare_linear", density=0.4, seed=5).core("layer0", basis)
    kept = C != 0
    torch.testing.assert_close(C[kept], torch.full_like(C[kept], 2.0 / 0.4))  # 1/(1 − p), p = 0.6
    assert 0.35 < kept.float().mean().item() < 0.45  # 1024 Bernoulli(0.4) draws
    assert C.mean().item() == pytest.approx(2.0, rel=0.12)  # E[Ĉ] = C


def test_the_seed_fixes_the_mask(basis):
    ones = core_adapter(basis, torch.ones(K, K))
    first = fuse([ones], [1.0], basis, "dare_linear", density=0.5, seed=1).core("layer0", basis)
    again = fuse([ones], [1.0], basis, "dare_linear", density=0.5, seed=1).core("layer0", basis)
    other = fuse([ones], [1.0], basis, "dare_linear", density=0.5, seed=2).core("layer0", basis)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_full_density_is_task_arithmetic_and_ties_without_trimming(basis):
    gen = torch.Generator().manual_seed(0)
    a, b = (core_adapter(basis, torch.randn(K, K, generator=gen)) for _ in range(2))
    linear = fuse([a, b], [0.3, 0.9], basis).core("layer0", basis)
    torch.testing.assert_close(fuse([a, b], [0.3, 0.9], basis, "dare_linear", density=1.0).core("layer0", basis),
                               linear)
    ties = fuse([a, b], [0.3, 0.9], basis, "ties", density=1.0).core("layer0", basis)
    torch.testing.assert_close(fuse([a, b], [0.3, 0.9], basis, "dare_ties", density=1.0).core("layer0", basis), ties)


def test_dare_ties_elects_signs_after_dropping():
    basis = toy_basis(k=4)
    a, b = diag_adapter(basis, [3.0, 3.0, 3.0, 3.0]), diag_adapter(basis, [-1.0, -1.0, -1.0, -1.0])
    got = fuse([a, b], [1.0, 1.0], basis, "dare_ties", density=0.5, seed=0).core("layer0", basis).diagonal()
    # every entry is 6 (only a kept, or both kept: a wins the vote), -2 (only b kept) or 0 (both dropped)
    assert set(got.tolist()) <= {6.0, -2.0, 0.0}
