"""Process-wide memory behaviour every server role wants.

glibc raises its mmap threshold each time a large block is freed (the "dynamic" threshold), so
after one burst of 10 MB tensors every later large buffer comes from the heap and the process
keeps its high-water mark for good. Fixing the threshold keeps buffers above it mmap'd and
returned to the OS when freed (measured with bench/fuzz.py: the master grew 92-103 MB over
20,000 fuzzed client messages with the dynamic threshold, 66 MB with it fixed).
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value


def return_large_buffers_to_the_os() -> bool:
    """Fix glibc's mmap threshold (no-op elsewhere); True when it took effect."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc (musl, macOS): their allocators behave differently
        return False
