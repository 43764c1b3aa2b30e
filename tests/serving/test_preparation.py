"""A request's mixture on its way to a slot: one registry read per ref, fused once, typed errors."""

from __future__ import annotations

import pytest
import torch

from adapters_zoo.errors import InvalidConfig, InvalidMixture
from adapters_zoo.kinds import get_kind
from fusion.cores import adapter_cores
from fusion.methods import METHODS
from fusion.mixture import fuse_mixture
from serving.generation import SamplingParams
from serving.preparation import Job


def job(model: str, adapters=None, method=None, params=None) -> Job:
    return Job("completion", model, ["abc"], None, SamplingParams(max_tokens=2), 1, False, False, adapters, method,
               params)


def test_a_mixture_is_read_once_per_ref_and_fused_once(service, monkeypatch, count_gets):
    calls = count_gets(service.registry)
    loads: list[str] = []
    load_record = service.registry.load_record
    monkeypatch.setattr(service.registry, "load_record", lambda rec: (loads.append(rec.ref), load_record(rec))[1])
    misses = service.engine.mixtures.misses
    _, first = service.prepare(job("svft:0.25,rotation@1:0.75"))
    assert calls == ["svft", "rotation@1"] and sorted(loads) == ["rotation@1", "svft@1"]
    assert service.engine.mixtures.misses == misses + 1
    _, again = service.prepare(job("base", {"rotation": 0.75, "svft@1": 0.25}))
    assert again is first, "the same resolved mixture, however spelled, is the cached one"
    assert calls[2:] == ["rotation", "svft@1"] and len(loads) == 2, "a cached mixture loads no adapter"
    assert first.key.pairs == (("rotation@1", 0.75), ("svft@1", 0.25))


def test_an_adapter_is_checked_against_the_basis_once_and_its_cores_counted(service, monkeypatch):
    """A request miss parses, checks and evaluates each adapter once; the adapter cache's bytes are the
    adapters' and the cores they keep alive."""
    layers = len(service.registry.load("svft").params)
    checks: list[str] = []
    kind = get_kind("svft")
    check_params = kind.check_params
    monkeypatch.setattr(kind, "check_params", lambda *a: (checks.append(a[-1]), check_params(*a))[1])
    service.preparer.adapters.clear()
    service.prepare_mixture("svft:0.31,scale:0.69")
    assert len(checks) == layers, "the registry's check on load is the only one"
    cache, basis = service.preparer.adapters, service.engine.basis
    params = sum(t.numel() * t.element_size() for a in cache.values() for p in a.params.values() for t in p.values())
    cores = sum(adapter_cores(a, basis).nbytes for a in cache.values())  # cores and packs
    assert len(cache) == 2 and cores > 0 and cache.nbytes == params + cores
    service.prepare_mixture("svft:0.32,scale:0.68", method="ties")  # a new mixture of held adapters
    assert len(checks) == layers


def test_base_and_bad_mixtures_are_typed_errors(service):
    assert service.prepare(job("base"))[1] is None
    with pytest.raises(InvalidMixture, match="not both"):
        service.prepare(job("scale", {"svft": 1.0}))
    with pytest.raises(InvalidMixture, match="need a mixture"):
        service.prepare(job("base", None, "ties"))
    with pytest.raises(InvalidMixture, match="same adapter"):
        service.prepare(job("scale,scale@1"))
    with pytest.raises(InvalidMixture, match="at most 8"):
        service.prepare(job(",".join(f"a{i}" for i in range(9))))
    with pytest.raises(InvalidConfig, match="unknown fusion method"):
        service.prepare(job("svft:0.5,scale:0.5", None, "no_such_method"))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_offline_and_online_give_the_same_cores_in_any_order(service, method):
    """``specfuse fuse`` / ``POST /v1/fuse`` and a request naming the same mixture serve one set of cores,
    however the mixture is typed (DARE's masks are drawn over the sources' order)."""
    orders = ["svft:0.5,scale:0.3,scale_lora:0.2", "scale_lora:0.2,svft:0.5,scale:0.3"]
    params = {"on_overlap": "warn"} if method == "slices" else None  # these sources overlap everywhere
    online = service.prepare_mixture(orders[0], method=method, params=params)
    assert service.prepare_mixture(orders[1], method=method, params=params) is online
    basis = service.engine.basis
    for mixture in orders:
        fused, _, pairs = fuse_mixture(service.registry, mixture, method, params, fingerprint=basis.fingerprint)
        assert [ref for ref, _ in pairs] == [e.split(":")[0] + "@1" for e in mixture.split(",")]
        assert [s["name"] for s in fused.meta["fusion"]["sources"]] == [ref for ref, _ in pairs]
        for layer in basis.layer_names():
            core = fused.core(layer, basis) if layer in fused.params else None
            if online.cores[layer] is None:
                assert core is None or not core.any(), (method, mixture, layer)
            else:
                assert torch.equal(core.float(), online.cores[layer]), (method, mixture, layer)
            res = fused.residual(layer, basis) if layer in fused.params else None
            assert (res is None) == (layer not in online.residuals)
            if res is not None:
                assert all(torch.equal(a.float(), b) for a, b in zip(res, online.residuals[layer]))
