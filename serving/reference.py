"""The plain reference the fast paths are tested against: one request at a time, dense weights.

For each request the target weights become ``W + Σ wᵢ ΔWᵢ`` with ``ΔWᵢ = Adapter.delta``
(the dense out×in update, core and residual), the model runs the whole sequence again for
every new token (no KV cache, no batching, no slots), and the weights are restored.
Slow by design: it shares no code with the engine's routing, tables or cache handling.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from adapters_zoo.basis import Basis
from adapters_zoo.format import Adapter

Mixture = list[tuple[Adapter, float]]  # empty: the base model


@contextmanager
def merged(model: torch.nn.Module, basis: Basis, mixture: Mixture) -> Iterator[torch.nn.Module]:
    """``model`` with ``W += Σ w ΔW`` on every layer the mixture touches, restored on exit."""
    saved = {}
    try:
        with torch.no_grad():
            for adapter, weight in mixture:
                for layer in adapter.layers:
                    module = model.get_submodule(layer)
                    w = module.weight
                    if layer not in saved:
                        saved[layer] = w.detach().clone()
                    delta = weight * adapter.delta(layer, basis)  # (out, in)
                    w += (delta.T if basis.transposed.get(layer) else delta).to(w)
        yield model
    finally:
        with torch.no_grad():
            for layer, w in saved.items():
                model.get_submodule(layer).weight.copy_(w)


@torch.no_grad()
def reference_logits(model: torch.nn.Module, basis: Basis, prompt: list[int], mixture: Mixture) -> torch.Tensor:
    """Logits (V,) of the last prompt position."""
    with merged(model, basis, mixture):
        return model(input_ids=torch.tensor([prompt])).logits[0, -1]


@torch.no_grad()
def reference_generate(model: torch.nn.Module, basis: Basis, prompt: list[int], mixture: Mixture,
                       max_tokens: int, eos_ids: set[int] = frozenset()) -> list[int]:
    """Greedy tokens, recomputing the whole sequence for each one."""
    out: list[int] = []
    with merged(model, basis, mixture):
        ids = list(prompt)
        for _ in range(max_tokens):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token in eos_ids:
                break
            out.append(token)
            ids.append(token)
    return out
