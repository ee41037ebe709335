"""glibc allocator settings for a process that streams MiB-sized buffers through threads.

By default glibc raises its mmap threshold after the first large free, so later 1 MiB
chunk buffers come from per-thread heaps that keep the memory after it is freed: with
ten uploads at once the aggregator held ~1.3× the model of dead chunks. A fixed
threshold hands such buffers back to the kernel on free, and two arenas bound the
per-thread heaps. It costs a page-fault per fresh page, which is small next to TLS and
hashing of the same bytes.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def return_large_buffers(threshold: int = 256 << 10, arenas: int = 2) -> bool:
    """Apply the settings; False (and nothing changed) where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(
        libc.mallopt(_M_ARENA_MAX, arenas)
    )
    if not ok:
        log.warning("mallopt refused the memory settings; large buffers may be retained")
    return ok
