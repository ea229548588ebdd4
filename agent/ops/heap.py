"""Give memory freed after a burst back to the system.

A burst of readings allocates readings, results and paho's packets on several threads; once
it is over Python frees them, but glibc keeps the freed pages in its per-thread arenas, so
the resident size stays at the burst's high-water mark (about 4 KB per reading of the burst:
+40 MB after 8,000 readings sent at once, measured with ``scripts/soak.py``).
``malloc_trim(0)`` returns those pages. It walks the heap (milliseconds; ctypes releases the
GIL meanwhile), so it runs from the health loop, and only while the resident size is above
the lowest a trim has left it: a trim in the middle of a burst frees little, the one after
it the rest.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

GROWTH_MB = 4.0  # trim while RSS is this much above the lowest a trim has left it


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None (musl, macOS: nothing to call)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class HeapTrimmer:
    """Calls ``malloc_trim`` when RSS has grown; used by one thread (the health loop)."""

    def __init__(
        self, rss: Callable[[], float | None], trim: Callable[[int], int] | None = None
    ) -> None:
        self._rss = rss
        self._trim = trim if trim is not None else _load_malloc_trim()
        self._floor: float | None = None  # the lowest RSS a trim has left
        self.trims = 0

    def maybe_trim(self) -> None:
        """Trim if RSS is GROWTH_MB above the lowest a trim has left (or on the first call)."""
        if self._trim is None:
            return
        before = self._rss()
        if before is None:
            return
        if self._floor is not None and before < self._floor + GROWTH_MB:
            return
        self._trim(0)
        self.trims += 1
        after = self._rss()
        left = after if after is not None else before
        self._floor = left if self._floor is None else min(self._floor, left)
        log.debug("heap_trimmed", rss_before_mb=before, rss_after_mb=left)
