"""The C allocator of a long-running daemon: glibc's malloc tuned at start, and free memory handed
back to the kernel after the few moments that allocate a lot at once (README "Performance").

glibc gives each thread that allocates its own arena (up to eight per core), grows its threshold
for serving large blocks by mmap each time one is freed (then a scrape's few MB of text stay in the
heap after it), and keeps up to twice that threshold free at the top of a heap. The daemon's
threads take turns under the GIL, so one arena costs it no speed. Another C library is left as it
is, and so is any setting the operator made (the MALLOC_* variables, or GLIBC_TUNABLES).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable, Mapping

# mallopt parameters (glibc's malloc.h), with the environment variable that sets each at start.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
SETTINGS = (
    ("MALLOC_ARENA_MAX", M_ARENA_MAX, 1),
    ("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, 128 * 1024),  # glibc's initial value, fixed
    ("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, 128 * 1024),
)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's own C library where it is glibc; None elsewhere (musl, macOS)."""
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return None
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (AttributeError, OSError, ValueError):
        return None


def tune(environ: Mapping[str, str] = os.environ, libc: Callable[[], ctypes.CDLL | None] = _glibc) -> list[str]:
    """Set each of SETTINGS the operator did not; the names of those set."""
    c = libc()
    if c is None or "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return []
    return [name for name, param, value in SETTINGS if name not in environ and c.mallopt(param, value) == 1]


def trim(libc: Callable[[], ctypes.CDLL | None] = _glibc) -> bool:
    """Hand the free pages of every arena back to the kernel; whether any were."""
    c = libc()
    return c is not None and bool(c.malloc_trim(0))
