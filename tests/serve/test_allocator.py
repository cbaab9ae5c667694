"""Memory that a training step freed goes back to the system (glibc), so a server that trained
whole steps while idle does not serve its next load at the step's size."""

from __future__ import annotations

import re

import pytest

from unilora.serve.allocator import return_freed_memory


def resident_mb() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def test_freed_heap_memory_goes_back():
    if not return_freed_memory():
        pytest.skip("the C library is not glibc: malloc_trim does not exist")
    # 3,000 blocks of 64 KB live in malloc's heap (below its mmap threshold); the last one, kept,
    # stops free() from shrinking the heap from its top, as a step's long-lived tensors do
    blocks = [bytearray(64 * 1024) for _ in range(3000)]
    kept = blocks.pop()
    del blocks
    before = resident_mb()
    assert return_freed_memory()
    after = resident_mb()
    assert before - after > 100, (before, after)  # most of the 190 MB freed
    assert len(kept) == 64 * 1024
