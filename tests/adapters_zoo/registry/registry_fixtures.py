"""Helpers for the registry tests: a tiny Llama on disk and adapters with non-trivial params.

A module of its own (not conftest) so that ``from registry_fixtures import K`` cannot pick
up another directory's conftest.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from adapters_zoo.basis import Basis
from adapters_zoo.format import Adapter, new_adapter

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
