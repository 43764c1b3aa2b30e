"""Fixtures for the fusion tests: the tiny models of tests/conftest.py, their bases, moved adapters."""

from __future__ import annotations

import pytest
import torch
from fusion_helpers import K, moved

from adapters_zoo.basis import Basis, compute_basis
from adapters_zoo.format import Adapter

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ids() -> torch.Tensor:
    return torch.randint(4, 90, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def llama_basis(tiny_llama_dir) -> Basis:
    return compute_basis(tiny_llama_dir, K, progress=False)


@pytest.fixture(scope="session")
def gpt2_basis(tiny_gpt2_dir) -> Basis:
    return compute_basis(tiny_gpt2_dir, K, progress=False)


@pytest.fixture(scope="session")
def other_basis(other_llama_dir) -> Basis:
    return compute_basis(other_llama_dir, K, progress=False)


@pytest.fixture(scope="session")
def mixed(llama_basis) -> tuple[list[Adapter], list[float]]:
    """Five kinds on overlapping layer sets, with residuals (lora, scale's LoRA term, additive)."""
    layers = llama_basis.layer_names()
    adapters = [
        moved("scale", {"rank": 6, "lora_rank": 2}, llama_basis, 1),
        moved("svft", {"pattern": "banded", "d": 1}, llama_basis, 2, layers=layers[:9]),
        moved("rotation", {"rank": 4, "slice": [2, 6]}, llama_basis, 3),
        moved("additive", {"rank": 3}, llama_basis, 4, layers=layers[4:]),
        moved("lora", {"rank": 3}, llama_basis, 5, layers=layers[::2]),
    ]
    return adapters, [0.7, 0.4, 1.0, 0.5, 0.3]
