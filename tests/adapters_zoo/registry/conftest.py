"""Fixtures: two tiny Llamas (two bases), their bases, adapter files with non-trivial params."""

from __future__ import annotations

from pathlib import Path

import pytest
from registry_fixtures import TARGETS, K, perturbed, save_llama

from adapters_zoo.basis import Basis, compute_basis
from adapters_zoo.format import save_adapter
from adapters_zoo.registry import Registry


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return save_llama(root / "base_a", seed=0), save_llama(root / "base_b", seed=1)


@pytest.fixture(scope="session")
def bases(model_dirs) -> tuple[Basis, Basis]:
    first = compute_basis(model_dirs[0], K, TARGETS, progress=False)
    second = compute_basis(model_dirs[1], K, TARGETS, progress=False)
    assert first.fingerprint != second.fingerprint
    return first, second


@pytest.fixture(scope="session")
def basis(bases) -> Basis:
    return bases[0]


@pytest.fixture(scope="session")
def adapter_files(tmp_path_factory, bases) -> dict[str, Path]:
    """name -> adapter file; 'other_base' belongs to the second base."""
    root = tmp_path_factory.mktemp("adapters")
    first, second = bases
    specs = {
        "math": ("scale", {"rank": 4}, first, 1),
        "code": ("svft", {"pattern": "banded", "d": 1, "rank": 4}, first, 2),
        "style": ("rotation", {"rank": 3}, first, 3),
        "lora": ("lora", {"rank": 2}, first, 4),
        "other_base": ("scale", {"rank": 4}, second, 5),
    }
    return {
        name: save_adapter(perturbed(kind, cfg, b, seed), root / f"{name}.safetensors")
        for name, (kind, cfg, b, seed) in specs.items()
    }


@pytest.fixture
def registry(tmp_path, basis) -> Registry:
    """A fresh registry that has declared the first base."""
    reg = Registry(tmp_path / "home")
    reg.add_basis(basis)
    yield reg
    reg.close()
