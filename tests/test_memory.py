"""keep_freed_memory: glibc's thresholds are set (a block above glibc's largest dynamic mmap
threshold comes from the heap and stays there when freed)."""
import subprocess
import sys
import textwrap

import pytest

from fxdecomp.run.memory import _glibc, keep_freed_memory

glibc = pytest.mark.skipif(not hasattr(_glibc(), "mallinfo2"),
                           reason="malloc is not glibc's (>= 2.33, for mallinfo2)")

# A fresh process: a 48 MiB block is always mmapped by glibc's defaults (its dynamic mmap
# threshold never passes 32 MiB) and unmapped when freed; after keep_freed_memory (a 64 MiB
# mmap threshold by default) it comes from the heap (the arena grows) and stays there when freed.
PROBE = textwrap.dedent("""
    import ctypes, sys, torch
    from fxdecomp.run.memory import _glibc, keep_freed_memory
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                    "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = _glibc()
    libc.mallinfo2.restype = Info
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    a0 = libc.mallinfo2()
    t = torch.ones(12 << 20)                        # 48 MiB
    a1 = libc.mallinfo2()
    del t
    a2 = libc.mallinfo2()
    mib = lambda v: v / 2**20
    print(mib(a1.arena - a0.arena), mib(a1.hblkhd - a0.hblkhd), mib(a2.arena - a0.arena),
          mib(a2.fordblks - a0.fordblks))
""")


def _probe(mode):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return [float(v) for v in out]


@glibc
def test_freed_memory_is_kept_in_the_heap():
    grown, mapped, kept, free = _probe("keep")
    # (the heap may have held a few MiB free already: it grows by at least 40 of the 48)
    assert grown >= 40 and mapped == 0           # from the heap, not a fresh mapping
    assert kept >= 40 and free >= 40             # freed, and still the process's to reuse
    grown, mapped, kept, _ = _probe("default")   # glibc's own choice: a mapping of its own
    assert mapped >= 48 and grown < 8 and kept < 8


def test_thresholds_must_fit_mallopt():
    with pytest.raises(ValueError, match="trim_threshold"):
        keep_freed_memory(trim_threshold=-1)
    with pytest.raises(ValueError, match="mmap_threshold"):
        keep_freed_memory(mmap_threshold=1 << 31)
