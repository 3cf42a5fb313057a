"""Process-wide tuning for the one-shot ``zimage`` command (never applied by the library itself).

Both settings trade things a long-lived host such as ComfyUI needs for speed in a process that exits after
one job, which is why only the command line calls :func:`prepare`.

- :func:`recycle_large_blocks`: glibc serves every block over 32 MB with a fresh ``mmap`` and unmaps it on
  free. A CPU generation allocates and frees such blocks constantly (a 512x512 VAE decode: ~5 GB of
  activations of 16-270 MB each), and every fresh page is a page fault plus zeroing: on the reference CPU
  VM ~1 s per GB, about a tenth of the decode. Recycling keeps freed memory in the heap instead (never
  returned to the OS before the process ends).
- :func:`settle_imports`: importing transformers leaves ~400k Python objects and a few garbage cycles; each
  full garbage collection then costs ~0.2 s, and the command collects after every stage to free the
  stage's model. Importing it up front, collecting once and freezing what exists makes later
  collections scan only the objects made after it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
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


def settle_imports() -> None:
    """Import what the text-encoding stage imports, free the import's garbage, freeze the rest (see above)."""
    try:
        import transformers.models.qwen3.modeling_qwen3  # noqa: F401 - the text encoder's model classes
        from transformers import AutoTokenizer  # noqa: F401
    except ImportError as e:  # the text encoder's own loading reports it, in one line, when it gets there
        log.debug("not importing transformers up front: %s", e)
    gc.collect()
    gc.freeze()


def prepare() -> None:
    """Both of the above: call once, at the start of a one-shot command."""
    recycle_large_blocks()
    settle_imports()
