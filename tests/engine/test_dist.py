"""Process set-up in engine/dist.py (the distributed paths run in tests/test_fsdp*.py and the
recipes' two-process tests)."""

import resource
import sys

import pytest
import torch

from tether.engine.dist import keep_freed_host_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_host_memory_is_reused_not_faulted_in_again():
    """A 64 MB buffer freed and allocated again is 16384 pages of 4 KB. glibc's default maps a
    block that size fresh each time (every page a minor fault when first written); once
    keep_freed_host_memory() has raised the thresholds the second block reuses the first's
    pages, so writing it faults far fewer than one page in ten."""
    assert keep_freed_host_memory()
    for _ in range(2):  # the first blocks after the change may still come from older mappings
        first = torch.empty(16 * 2**20, dtype=torch.float32)  # 64 MB
        first.fill_(1.0)
        del first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = torch.empty(16 * 2**20, dtype=torch.float32)
    second.fill_(2.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 1638, f"{faults} page faults writing a reused 64 MB buffer"
