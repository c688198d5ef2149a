"""Host memory: hand freed tensor memory back to the operating system (glibc, CPU work).

glibc's malloc serves allocations below a threshold from its heaps and raises that threshold
(up to 32 MB) each time a larger block is freed. A CPU training iteration frees and re-allocates
hundreds of tensors between 1 and 32 MB; they fragment the heaps, which keep the freed memory.
Measured on one CRLN iteration at 112 x 112 x 80 (V-Net 16, 2 + 2 crops): 1.3 GiB stayed
resident between iterations and the peak RSS rose from 5.1 to 5.8 GiB. Fixing the mmap threshold
at 1 MB (``mallopt(M_MMAP_THRESHOLD)``, which also stops the automatic raise) serves every
tensor of 1 MB or more with its own mapping, returned on free; the cost is a page fault per
fresh page (measured in ``benchmarks/RESULTS.md``). Opt out with ``CRLNSEG_GLIBC_MMAP=0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["MMAP_THRESHOLD", "release_freed_memory"]

MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


def release_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve allocations >= ``threshold`` bytes by mmap; True when glibc accepted it.

    A no-op (False) off Linux, with another C library, or when ``CRLNSEG_GLIBC_MMAP=0``.
    Process-wide: call it from command entry points, not from library code.
    """
    if not sys.platform.startswith("linux") or os.environ.get("CRLNSEG_GLIBC_MMAP") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
