"""Keep the process's memory at what it holds: give freed tensor memory back to the operating system.

glibc serves mid-sized allocations (a per-expert tensor, an activation block: 1-32 MB) from its heap
once its adaptive threshold has grown, and keeps freed heap pages for reuse; a layer-streamed run frees
a whole layer's worth of such blocks before reading the next, so resident memory would climb with
fragmentation instead of staying at one layer. :func:`bound_heap` fixes the threshold at 1 MiB (larger
blocks are mapped and unmapped on their own: returned at once) and :func:`release_heap` trims what the
heap keeps after a layer is released. Measured on a quantize of two Qwen3-MoE layers (hidden 1024, 64
experts): peak RSS 1.74 GB without, 1.20 GB with. Elsewhere than glibc both do nothing.
"""

from __future__ import annotations

import sys
from typing import Any

#: mallopt's parameter number for the mmap threshold (glibc's M_MMAP_THRESHOLD).
_M_MMAP_THRESHOLD = -3
#: Blocks from this size up are mapped on their own and given back when freed.
MMAP_THRESHOLD = 1 << 20

_LIBC: Any = None
_BOUND = False


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if sys.platform.startswith("linux"):
            import ctypes
            import ctypes.util

            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim"):
                    _LIBC = libc
            except OSError:
                pass
    return _LIBC


def bound_heap() -> None:
    """Map blocks of :data:`MMAP_THRESHOLD` and more on their own (idempotent; glibc only)."""
    global _BOUND
    libc = _libc()
    if libc and not _BOUND:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        _BOUND = True


def release_heap() -> None:
    """Give the heap's freed pages back to the operating system (glibc only)."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)
