"""Process memory set-up: glibc's arenas, and the garbage collector around start-up.

glibc gives each thread that allocates its own arena (up to 8 per core), and freed
1 MiB chunk buffers stay cached in whichever arena they came from: with ten uploads at
once on gRPC's and asyncio's threads, the aggregator kept ~0.5× the model of dead chunks.
Two arenas bound that; the measured cost on throughput is nil (docs/benchmarks.md).
A fixed mmap threshold was tried too: it returns buffers at once but halves download
speed (a page fault per fresh page), so it is not used.

Start-up runs with the cyclic collector off (`pause_gc`, `started`): see `pause_gc`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import platform

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8


def limit_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas; False (and nothing changed) where libc is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if not libc.mallopt(_M_ARENA_MAX, arenas):
        log.warning("mallopt refused M_ARENA_MAX=%d; freed buffers may be retained", arenas)
        return False
    return True


def pause_gc() -> None:
    """Start-up (imports, config, the app's data) makes objects that nearly all live on:
    the cyclic collector running over them as they pile up cost ~10% of a process's
    start. `started` turns it back on."""
    gc.disable()


def started() -> None:
    """Start-up is over: collect what it left behind once, move the survivors out of the
    collector's sight (later collections scan only what the work creates), give glibc's
    free pages back, and turn the collector on again."""
    gc.collect()
    gc.freeze()
    gc.enable()
    if platform.libc_ver()[0] == "glibc":
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
