"""tsv: per-task low-rank cores whose singular vectors are orthogonalised before summing."""

from __future__ import annotations

import torch
from fusion_helpers import core_adapter, toy_basis

from fusion.fuse import fuse


def _random_core(k: int, seed: int) -> torch.Tensor:
    return torch.randn(k, k, generator=torch.Generator().manual_seed(seed))


def test_one_task_at_full_rank_is_itself():
    basis = toy_basis(k=5)
    a = core_adapter(basis, _random_core(5, 0))
    fused = fuse([a], [0.8], basis, "tsv", rank_fraction=1.0).core("layer0", basis)
    torch.testing.assert_close(fused, 0.8 * a.core("layer0", basis), atol=1e-5, rtol=1e-5)


def test_tasks_in_orthogonal_subspaces_just_add():
    basis = toy_basis(k=4)
    c1, c2 = torch.zeros(4, 4), torch.zeros(4, 4)
    c1[:2, :2], c2[2:, 2:] = _random_core(2, 1), _random_core(2, 2)
    a, b = core_adapter(basis, c1), core_adapter(basis, c2)
    fused = fuse([a, b], [1.0, 0.5], basis, "tsv").core("layer0", basis)  # r = 4 / 2 = 2 per task
    torch.testing.assert_close(fused, c1 + 0.5 * c2, atol=1e-5, rtol=1e-5)


def test_overlapping_tasks_keep_their_top_singular_values_on_orthogonal_vectors():
    k = 6
    basis = toy_basis(k=k)
    cores = [_random_core(k, s) for s in (3, 4, 5)]
    adapters = [core_adapter(basis, c) for c in cores]
    weights = [1.0, 0.5, 2.0]
    fused = fuse(adapters, weights, basis, "tsv").core("layer0", basis)  # r = 6 / 3 = 2 per task
    kept = torch.cat([torch.linalg.svdvals(w * c)[:2] for w, c in zip(weights, cores)])
    torch.testing.assert_close(torch.linalg.svdvals(fused), kept.sort(descending=True).values, atol=1e-4, rtol=1e-4)
    linear = fuse(adapters, weights, basis).core("layer0", basis)
    assert (fused - linear).abs().max() > 0.1
    scaled = fuse(adapters, weights, basis, "tsv", scale=0.5).core("layer0", basis)
    torch.testing.assert_close(scaled, 0.5 * fused)
