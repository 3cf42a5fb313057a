"""Process-wide allocator tuning for the one-shot ``zimage`` command (never applied by the library itself).

glibc serves every block over 32 MB with a fresh ``mmap`` and unmaps it on free. A CPU generation
allocates and frees such blocks constantly (a 512x512 VAE decode: ~5 GB of activations of 16-270 MB
each), and every fresh page is a page fault plus zeroing: on the reference CPU VM ~1 s per GB, about a
tenth of the decode. :func:`recycle_large_blocks` lets glibc keep freed memory in its heap and hand it
out again instead. The cost is that memory freed late in a process is not returned to the OS before the
process ends, which a command that exits after one job does not care about, but a long-lived host such
as ComfyUI would: that is why only the command line calls it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LIMIT = 2**31 - 1  # mallopt takes a C int


def recycle_large_blocks() -> bool:
    """Ask glibc to serve large blocks from its heap and keep freed memory there; True if it took effect.

    A no-op (False) where the C library is not glibc (macOS, Windows, musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, _LIMIT)) and bool(mallopt(_M_TRIM_THRESHOLD, _LIMIT))
    log.debug("glibc large-block recycling %s", "on" if ok else "refused")
    return ok
