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

Off glibc (macOS, musl) there is no such call and nothing to do.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library the process runs on
    except (OSError, AttributeError):
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
