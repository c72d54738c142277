"""Process-wide CPU memory settings for runs of many forwards (extraction, benchmarks).

glibc's malloc hands the top of its heap back to the OS whenever more than a dynamic threshold
is free there (twice the largest recently freed mmapped block), and serves blocks at or above
another dynamic threshold with fresh mmaps. A forward whose live memory rises and falls (every
forward: activations are freed as it goes) then maps and zero-fills the same pages again on the
next call: minor page faults, a few thousand to tens of thousands per forward of a ViT-B at
batch 8 on this project's CPU machine, that cost a few percent of the forward and change from
run to run with the heap's layout. PyTorch's CPU tuning guide recommends jemalloc or tcmalloc
for the same reason; ``keep_freed_memory`` gets the same effect from glibc itself by fixing both
thresholds (what ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` do when set before
the process starts)."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3     # glibc <malloc.h>


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):    # not glibc (musl has no gnu_get_libc_version)
        return None
    return libc


def keep_freed_memory(trim_threshold: int = 1 << 30, mmap_threshold: int = 64 << 20) -> bool:
    """Keep memory freed during a forward in this process's heap for the next forward.

    Blocks under ``mmap_threshold`` bytes come from the heap (larger ones, e.g. a tokens-mode
    components tensor, are still mapped and returned on their own; 64 MiB by default, twice
    glibc's own dynamic limit, so that a Swin-T stage-1 MLP activation at batch 8, 38.5 MB, is
    reused too; the heap may grow to two or three such blocks before it settles), and up to
    ``trim_threshold`` bytes of free heap are kept rather than returned to the OS. The process's
    resident memory then stays near its peak between forwards. Process-wide and not undone:
    call it at the start of a program that runs many forwards (``fxdecomp extract`` and the
    benchmarks do), not from library code. Returns whether it applied: False where malloc is
    not glibc's (macOS, Windows, musl), where it does nothing."""
    for name, value in (("trim_threshold", trim_threshold), ("mmap_threshold", mmap_threshold)):
        if not 0 <= value < 1 << 31:       # mallopt takes a C int
            raise ValueError(f"{name} must be in [0, 2**31) bytes, got {value}")
    libc = _glibc()
    if libc is None:
        return False
    # setting either threshold turns glibc's dynamic adjustment of both off: set both
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))) \
        and bool(libc.mallopt(M_TRIM_THRESHOLD, int(trim_threshold)))
