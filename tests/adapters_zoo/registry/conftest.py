"""Fixtures: two tiny Llamas (two bases), their bases, adapter files with non-trivial params."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from adapters_zoo.basis import Basis, compute_basis
from adapters_zoo.format import Adapter, new_adapter, save_adapter
from adapters_zoo.registry import Registry

K = 4
TARGETS = "q_proj,v_proj"


def save_llama(path: Path, seed: int) -> Path:
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64,
    )
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def perturbed(kind: str, config: dict | None, basis: Basis, seed: int) -> Adapter:
    """A fresh adapter whose trainable tensors are random (not the identity), seeded."""
    adapter = new_adapter(kind, config, basis, meta={"seed": seed})
    gen = torch.Generator().manual_seed(seed)
    for params in adapter.params.values():
        for name, t in params.items():
            if name not in adapter.kind_impl.frozen:
                params[name] = 0.1 * torch.randn(t.shape, generator=gen)
    return adapter


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
