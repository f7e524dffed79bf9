"""glibc malloc settings for the long-running processes (the mount and the daemon).

Their hot paths allocate and free buffers of a block's size (up to 8 MiB by default)
all the time: FUSE write buffers, chunks, sealed and fetched object bodies. By default
glibc serves such sizes with mmap, or returns the freed top of a heap to the kernel
at once (its thresholds adapt, and stay low when two buffers are freed together), so
the next buffer is fresh memory again: a page fault and a zeroed page every 4 KiB.
On this project's test machine (a virtual machine, where a fault is dear) the
ciphertext-and-header concatenation of a 2 MiB block took 2.6 ms instead of 0.3 ms.
Fixed thresholds keep such buffers in the heap and a bounded amount of free memory
for reuse."""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

#: allocations below this come from the heap (a block is at most 4x the average size:
#: 8 MiB by default, and mkfs allows up to 64 MiB blocks, which then use mmap)
MMAP_THRESHOLD = 16 << 20
#: free memory at the top of a heap (per arena) kept for reuse instead of returned
TRIM_THRESHOLD = 32 << 20
#: arenas (glibc's default is 8 per core, each keeping up to TRIM_THRESHOLD free): a
#: 10 GiB write peaked at 252 MiB RSS in the daemon with the default, 181 MiB with 4
ARENA_MAX = 4


def tune() -> bool:
    """Set the thresholds and the arena count unless the environment sets any of glibc's
    own (MALLOC_*_); False where there is no glibc mallopt (musl, say)."""
    if any(
        name in os.environ
        for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX")
    ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (M_ARENA_MAX, ARENA_MAX),
    )
    return all([bool(mallopt(option, value)) for option, value in settings])
