"""The one bounded LRU behind every host cache: entries and bytes bounded, least recent out first."""

from __future__ import annotations

import threading

import pytest

from adapters_zoo.cache import BoundedCache


def test_least_recently_used_goes_first_and_hits_are_counted():
    cache: BoundedCache[str, int] = BoundedCache(capacity=2)
    builds: list[str] = []

    def build(key: str) -> int:
        builds.append(key)
        return len(key)

    assert cache.get_or_build("a", lambda: build("a")) == 1
    assert cache.get_or_build("bb", lambda: build("bb")) == 2
    assert cache.get_or_build("a", lambda: build("a")) == 1  # a is now the most recent
    cache.get_or_build("ccc", lambda: build("ccc"))  # evicts bb
    assert cache.keys() == ["a", "ccc"] and builds == ["a", "bb", "ccc"]
    assert (cache.hits, cache.misses, cache.evictions) == (1, 3, 1)
    assert cache.get("bb") is None and "bb" not in cache


def test_bytes_bound_evicts_until_under_it_but_keeps_the_newest():
    cache: BoundedCache[int, bytes] = BoundedCache(capacity=100, max_bytes=10, sizeof=len)
    for i in range(5):
        cache.put(i, b"xxxx")  # 4 bytes each: at most 2 fit
    assert cache.keys() == [3, 4] and cache.nbytes == 8 and cache.evictions == 3
    cache.put(9, b"x" * 50)  # alone over the bound: kept, the others leave
    assert cache.keys() == [9] and cache.nbytes == 50
    assert cache.pop(9) == b"x" * 50 and cache.nbytes == 0 and len(cache) == 0


def test_none_is_a_value_built_once():
    cache: BoundedCache[str, None] = BoundedCache(capacity=4)
    calls = []
    for _ in range(3):
        assert cache.get_or_build("k", lambda: calls.append(1)) is None
    assert calls == [1] and cache.hits == 2


def test_a_concurrent_build_keeps_the_first_stored_value():
    cache: BoundedCache[str, object] = BoundedCache(capacity=4)
    started, release = threading.Event(), threading.Event()
    got = []

    def slow() -> object:
        started.set()
        release.wait(5)
        return "slow"

    worker = threading.Thread(target=lambda: got.append(cache.get_or_build("k", slow)))
    worker.start()
    started.wait(5)
    assert cache.get_or_build("k", lambda: "fast") == "fast"
    release.set()
    worker.join(5)
    assert got == ["fast"] and cache.get("k") == "fast"


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="capacity"):
        BoundedCache(0)
    with pytest.raises(ValueError, match="sizeof"):
        BoundedCache(4, max_bytes=10)
