"""Host memory: hand freed tensor memory back to the operating system (glibc, CPU work).

glibc's malloc serves allocations below a threshold from its heaps and raises that threshold
(up to 32 MB) each time a larger block is freed. A CPU training iteration frees and re-allocates
hundreds of tensors between 1 and 32 MB; they fragment the heaps, which keep the freed memory.
Fixing the mmap threshold at 1 MB (``mallopt(M_MMAP_THRESHOLD)``, which also stops the automatic
raise) serves every tensor of 1 MB or more with its own mapping, returned on free, at the price
of fresh page faults. Measured on a quiet 2-core CPU (``benchmarks/RESULTS.md``), one CRLN
iteration at 112 x 112 x 80 with activation checkpointing: peak 4.35 -> 3.42 GiB, 12.3 -> 14.7 s.
So ``crlnseg train`` does it only in its memory-saving mode (``train.activation_checkpointing``
on the CPU); ``CRLNSEG_GLIBC_MMAP=1`` / ``=0`` forces it on / off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["MMAP_THRESHOLD", "release_freed_memory", "wanted"]

MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


def wanted(memory_mode: bool) -> bool:
    """Whether to fix the threshold: ``CRLNSEG_GLIBC_MMAP`` (1/0) if set, else ``memory_mode``."""
    forced = os.environ.get("CRLNSEG_GLIBC_MMAP")
    return memory_mode if forced is None else forced == "1"


def release_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve allocations >= ``threshold`` bytes by mmap; True when glibc accepted it.

    A no-op (False) off Linux or with a C library without ``mallopt``. Process-wide: call it
    from command entry points, not from library code.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
