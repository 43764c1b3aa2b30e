"""Give the host memory a server has freed back to the operating system.

glibc's allocator keeps what a process frees inside its arenas, one per thread that
allocated (up to eight per core), and returns a page to the system only when it sits at
the top of an arena. A server frees in one thread what another allocated: request
threads resolve and fuse mixtures, the scheduler evicts them and ends rows. The free
space then spreads over every arena and resident memory climbs to a plateau far above
what is in use: on the tiny-base soak, 97 MB free inside the arenas beside 205 MB in use
after 150 s, and RSS up 19% from the first minute to the third while the bytes in use
stayed flat. ``malloc_trim(0)`` hands every wholly free page of every arena back
(``madvise``), which costs milliseconds; the scheduler calls it every ``heap_trim_s``
seconds while it works and once when it falls idle.

Between trims, freed memory should stay put. By default glibc serves every block above a
dynamic threshold (a prefill's activations: megabytes per layer) with a fresh ``mmap``
and unmaps it on ``free``, or trims the heap top back to the kernel, so the next forward
touches new pages: a page fault per 4 KiB written. On SmolLM2-135M (16 prompts × 32
tokens, one thread) the adapter path's extra tensors tipped the allocator into that
pattern, and the elementwise ops after it (``silu``, ``mul``) ran 3-7× slower: a prefill
cost 1.24× the base's instead of 1.12× (``benchmarks/bench_serving.py``, step rows).
:func:`keep_freed_memory` (called by a CPU engine) sets the thresholds once per process so
that blocks up to 32 MiB come from the heap and no ``free`` trims it: freed memory is reused
at once, and handed back only by the trimmer above.

Off glibc (macOS, musl) there are no such calls and nothing to do.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters (malloc.h)
MALLOPT_SETTINGS = (
    (M_MMAP_THRESHOLD, 32 * 2**20),  # blocks up to 32 MiB from the heap (the most glibc accepts on 64-bit)
    (M_TRIM_THRESHOLD, 2**31 - 1),  # a free never trims the heap top
    (M_TOP_PAD, 64 * 2**20),  # the heap grows in 64 MiB steps
)
_kept: bool | None = None


def _libc_function(name: str):
    try:
        return getattr(ctypes.CDLL(None), name)  # the C library the process runs on
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Make glibc reuse freed blocks instead of unmapping them (once per process); False off glibc."""
    global _kept
    if _kept is None:
        mallopt = _libc_function("mallopt") if _libc_function("gnu_get_libc_version") else None
        if mallopt is None:
            _kept = False
        else:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _kept = all(mallopt(param, value) == 1 for param, value in MALLOPT_SETTINGS)  # 1: accepted
    return _kept


def _malloc_trim() -> Callable[[int], int] | None:
    trim = _libc_function("malloc_trim")
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class HeapTrimmer:
    """``maybe_trim()`` at most every ``interval_s`` seconds; ``interval_s`` 0 never trims."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic,
                 trim: Callable[[int], int] | None = None):
        self.interval_s = interval_s
        self._clock = clock
        self._trim = trim if trim is not None else _malloc_trim()
        self._last = clock()
        self._dirty = False  # work was done since the last trim
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def worked(self) -> None:
        self._dirty = True

    def maybe_trim(self, idle: bool = False) -> bool:
        """Trim when the interval has passed, or when falling idle after work; True if it did."""
        if self._trim is None or self.interval_s <= 0 or not self._dirty:
            return False
        now = self._clock()
        if not idle and now - self._last < self.interval_s:
            return False
        self._trim(0)
        self._last, self._dirty = now, False
        self.trims += 1
        return True
