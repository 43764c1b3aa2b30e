"""A request's mixture on its way to a slot: one registry read per ref, fused once, typed errors."""

from __future__ import annotations

import pytest

from adapters_zoo.errors import InvalidConfig, InvalidMixture
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
    assert first.key.components == (("rotation@1", 0.75), ("svft@1", 0.25))


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
