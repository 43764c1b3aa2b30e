"""One bounded LRU for every host-side cache: parsed adapters, their cores, reduced mixtures, router memos.

    cache = BoundedCache(capacity=1024, max_bytes=64 << 20, sizeof=lambda m: m.nbytes)
    value = cache.get_or_build(key, build)   # build() runs outside the lock, at most once per miss

Bounded in entries and, with ``sizeof``, in bytes: what a cache holds is the client's
choice (distinct mixtures, adapters), the memory it takes is not. The newest entry is
kept even when it alone is over ``max_bytes`` (the caller needs it now). Thread-safe: a
value is built outside the lock, so two threads missing the same key may both build it
(harmless: values are pure functions of their key); the first stored wins.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    def __init__(self, capacity: int, max_bytes: int | None = None, sizeof: Callable[[V], int] | None = None):
        if capacity < 1:
            raise ValueError(f"capacity must be ≥ 1, got {capacity}")
        if max_bytes is not None and sizeof is None:
            raise ValueError("max_bytes needs sizeof")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.sizeof = sizeof
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()  # key -> (value, bytes), least recent first
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: K) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def get_or_build(self, key: K, build: Callable[[], V]) -> V:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self.hits += 1
                self._items.move_to_end(key)
                return item[0]
            self.misses += 1
        value = build()  # outside the lock: loading or fusing may take a while
        return self.put(key, value, replace=False)

    def put(self, key: K, value: V, replace: bool = True) -> V:
        """Store ``value`` (the held one wins unless ``replace``); returns what the cache holds for ``key``."""
        size = self.sizeof(value) if self.sizeof is not None else 0
        with self._lock:
            held = self._items.get(key)
            if held is not None and not replace:
                self._items.move_to_end(key)
                return held[0]
            if held is not None:
                self.nbytes -= held[1]
            self._items[key] = (value, size)
            self._items.move_to_end(key)
            self.nbytes += size
            while len(self._items) > 1 and (len(self._items) > self.capacity or
                                             (self.max_bytes is not None and self.nbytes > self.max_bytes)):
                _, (_, old_size) = self._items.popitem(last=False)
                self.nbytes -= old_size
                self.evictions += 1
        return value

    def pop(self, key: K) -> V | None:
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                return None
            self.nbytes -= item[1]
            return item[0]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0

    def keys(self) -> list[K]:
        with self._lock:
            return list(self._items)

    def values(self) -> list[V]:
        with self._lock:
            return [value for value, _ in self._items.values()]

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[K]:
        return iter(self.keys())
