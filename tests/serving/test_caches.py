"""Host caches are bounded in bytes: distinct mixtures are the client's choice, the memory they take is not."""

from __future__ import annotations

import argparse
import copy

import pytest

from adapters_zoo.errors import InvalidConfig
from serving.engine import Engine, EngineConfig, Mixture
from serving.serve_cli import MIXTURE_CACHE_MB, api_key_of, register_cli


@pytest.fixture(scope="module")
def engine(model, tokenizer, basis):
    return Engine(copy.deepcopy(model), tokenizer, basis, EngineConfig(slots=2, residual_slots=1,
                                                                       mixture_cache_bytes=64 << 10))


def test_the_mixture_cache_stays_within_its_bytes(engine, adapters):
    one = engine.prepare(Mixture.of([("scale", 0.5), ("svft", 0.5)]),
                         lambda c: adapters[c.ref])
    assert one.nbytes > 0
    for i in range(40):  # 40 distinct mixtures: far more bytes than the bound
        w = 0.1 + i / 100
        engine.prepare(Mixture.of([("scale", w), ("svft", 1 - w)]),
                       lambda c: adapters[c.ref])
    cache = engine.mixtures
    assert cache.nbytes <= 64 << 10 and cache.evictions > 0
    assert len(cache) <= (64 << 10) // one.nbytes
    assert cache.nbytes == sum(m.nbytes for m in cache.values())


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    return parser.parse_args(["serve", "MODEL", *argv])


def test_serve_flags_for_keys_and_caches(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SPECFUSE_API_KEY", raising=False)
    assert api_key_of(_args()) is None and _args().mixture_cache_mb == MIXTURE_CACHE_MB
    assert _args("--mixture-cache-mb", "8").mixture_cache_mb == 8
    monkeypatch.setenv("SPECFUSE_API_KEY", "from-env")
    assert api_key_of(_args()) == "from-env"
    (tmp_path / "key").write_text("from-file\n")
    assert api_key_of(_args("--api-key-file", str(tmp_path / "key"))) == "from-file"
    assert capsys.readouterr().err == ""
    assert api_key_of(_args("--api-key", "on-the-line")) == "on-the-line"
    assert "visible to anyone running ps" in capsys.readouterr().err
    with pytest.raises(InvalidConfig, match="empty"):
        api_key_of(_args("--api-key", " "))
    monkeypatch.delenv("SPECFUSE_API_KEY")
    with pytest.raises(InvalidConfig, match="needs an API key"):
        api_key_of(_args("--public-reads"))
    with pytest.raises(SystemExit):  # the flag that guarded everything is gone: that is the default
        _args("--protect-all")
