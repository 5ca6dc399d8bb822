"""Process set-up in engine/dist.py (the distributed paths run in tests/test_fsdp*.py and the
recipes' two-process tests)."""

import subprocess
import sys

import pytest

from tether.engine.dist import keep_freed_host_memory

PAGES = 16384  # a 64 MB block in 4 KB pages
CYCLES = 10

# Allocates, writes and frees a 64 MB block CYCLES times, then CYCLES times more, and prints the
# minor page faults of the second CYCLES. The block is requested as torch's CPU allocator does
# (posix_memalign, 64-byte alignment), straight from libc so that no other allocation (torch's
# worker threads, Python objects) lands between two cycles. glibc's default maps a block that
# size fresh each time (every page faults when first written); a heap that keeps freed memory
# serves the block again.
_PROBE = f"""
import ctypes, resource, sys
from tether.engine.dist import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
libc = ctypes.CDLL("libc.so.6")
size = {PAGES} * 4096

def cycle():
    block = ctypes.c_void_p()
    assert libc.posix_memalign(ctypes.byref(block), 64, ctypes.c_size_t(size)) == 0
    ctypes.memset(block, 1, size)
    libc.free(block)

for i in range({CYCLES}):  # warm-up
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range({CYCLES}):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_host_memory_is_reused_not_faulted_in_again():
    """In a fresh process (as `dist.init()` runs at the start of a recipe), cycles of allocating
    and writing a 64 MB block. With the thresholds raised the heap serves the block from freed
    memory: fewer than half of the 10 measured cycles fault their pages in (none here). With
    glibc's defaults nearly every cycle does (the premise; skipped where THP or another
    allocator already avoids it). The earlier probe allocated through torch, whose worker
    threads' allocations could land in the freed block between cycles: one clean-clone run
    saw every cycle fault with the thresholds raised."""
    kept = _faults("keep")
    assert kept < CYCLES // 2 * PAGES, f"{kept} page faults over {CYCLES} reused 64 MB blocks"
    default = _faults("default")
    if default < (CYCLES - 2) * PAGES:
        pytest.skip(f"the default allocator already reuses the block ({default} faults)")
    assert default > 4 * kept


def test_keep_freed_memory_can_be_switched_off(monkeypatch):
    """TETHER_KEEP_FREED_MEMORY=0 leaves glibc's defaults alone: nothing set, False returned."""
    monkeypatch.setenv("TETHER_KEEP_FREED_MEMORY", "0")
    assert keep_freed_host_memory() is False
