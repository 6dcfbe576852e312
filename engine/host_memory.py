"""Give the OS back the memory the C allocator keeps after freeing it (glibc only).

glibc keeps freed blocks in its heaps for reuse and can only shrink a heap from its top,
so after a large batch the process stays at the batch's peak resident size although most
of it is free. Measured on the default server under 64 streaming clients: 599 MiB in use
and 881 MiB free but resident in glibc's heaps when idle; `malloc_trim(0)` (which also
releases free pages inside heaps, not only at their top) took 89 ms and brought the
resident size from 1994 to 1187 MiB. The engine thread calls it when it goes idle, where
its cost delays nobody.
"""

from __future__ import annotations

import ctypes
import sys


def _load_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)  # glibc has it; musl does not
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()


def release_free_memory() -> bool:
    """Return the allocator's free memory to the OS. False where there is no such call
    (not glibc) or nothing could be released."""
    return _malloc_trim is not None and _malloc_trim(0) == 1
