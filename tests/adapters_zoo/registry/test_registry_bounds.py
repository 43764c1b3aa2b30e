"""The registry refuses what would harm every later request: changes past the bound, configs out of range."""

from __future__ import annotations

import json

import pytest
import torch
from registry_fixtures import perturbed
from safetensors.torch import save as save_tensors

from adapters_zoo.errors import AdapterFormatError, DeltaOutOfBounds, InvalidMixture
from adapters_zoo.format import MAX_DELTA_RATIO, _flat_tensors, _meta_strings, check_delta
from adapters_zoo.registry import parse_mixture


def test_an_adapter_past_the_delta_bound_is_refused(registry, basis):
    adapter = perturbed("scale", {"rank": 4}, basis, 11)
    registry.add(adapter, "ok")
    for params in adapter.params.values():
        params["lam"].fill_(1e30)
    with pytest.raises(DeltaOutOfBounds, match="max delta ratio"):
        registry.add(adapter, "huge")
    assert [r.name for r in registry.list()] == ["ok"]


def test_the_bound_is_relative_to_the_layers_spectrum(basis):
    layer = basis.layer_names()[0]
    lb = basis[layer]
    bound = MAX_DELTA_RATIO * float(lb.S.norm())
    check_delta(layer, torch.diag(torch.full((lb.k,), 0.99 * bound / lb.k**0.5)), None, lb)
    with pytest.raises(DeltaOutOfBounds):
        check_delta(layer, torch.diag(torch.full((lb.k,), 1.01 * bound / lb.k**0.5)), None, lb)
    with pytest.raises(DeltaOutOfBounds):
        check_delta(layer, torch.full((lb.k, lb.k), float("nan")), None, lb)
    B, A = torch.ones(lb.out_features, 1), torch.ones(1, lb.in_features)  # ‖BA‖_F = √(out·in)
    norm = (lb.out_features * lb.in_features) ** 0.5
    with pytest.raises(DeltaOutOfBounds, match=f"norm {1.01 * bound:.4g}, past the bound {bound:.4g}"):
        check_delta(layer, None, (B * bound / norm * 1.01, A), lb)


@pytest.mark.parametrize("config", [{"rank": 10**30}, {"rank": 4, "slice": [0, 10**12]}, {"rank": 4, "seed": -1}])
def test_config_ranges_are_checked(registry, basis, config):
    adapter = perturbed("scale", {"rank": 4}, basis, 12)
    data = save_tensors(_flat_tensors(adapter), metadata={**_meta_strings(adapter), "config": json.dumps(config)})
    with pytest.raises(AdapterFormatError, match=r"outside \[0, 1000000000\]"):
        registry.add(data, "wide")


def test_mixture_weights_are_bounded():
    assert parse_mixture("a:10,b:0.5") == [("a", 10.0), ("b", 0.5)]
    for text in ("a:10.5", "a:1e20", "a:1,b:-11"):
        with pytest.raises(InvalidMixture, match="max mixture weight"):
            parse_mixture(text, allow_negative=True)
