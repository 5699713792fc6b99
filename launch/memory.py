"""Process-wide memory behaviour every server role wants.

glibc raises its mmap threshold each time a large block is freed (the "dynamic" threshold), so
after one burst of 10 MB tensors every later large buffer comes from the heap and the process
keeps its high-water mark for good. Fixing the threshold keeps buffers above it mmap'd and
returned to the OS when freed (measured with bench/fuzz.py: the master grew 92-103 MB over
20,000 fuzzed client messages with the dynamic threshold, 66 MB with it fixed).

The price of mmap'd buffers is a page fault per 4 KiB page each time one is filled: a worker
receiving 105 MB of weights spent more CPU on those faults than on hashing them. With
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >= 2.35, transparent huge pages in `madvise`
or `always` mode) glibc asks for huge pages for those buffers: one fault per 2 MiB (measured with
bench/weightsync.py: worker CPU per full sync 1.04-1.05 s -> 0.71 s). A tunable is read only at
process start, so `large_buffer_env` is what a launcher adds to a role's environment
(launch/procs.py does; see docs/deployment.md for servers started otherwise).

The master holds messages of every size a client sends, so it returns large buffers
(`return_large_buffers_to_the_os`). A shard's large buffers are the frames of stages, 1 MiB
pieces received, held while their version is kept and freed at a prune, with the next stage's
pieces the same sizes: it keeps them (`keep_piece_buffers`), so a stage lands in memory the last
pruned version held instead of in fresh mappings (bench/weightsync.py, ninth round: the shards
took ~52,000 page faults per full sync, one per 4 KiB page received; their peak now stays
mapped after a prune, bounded by the versions they keep plus the staging bound).
A worker's large buffers are mostly a model's activations, allocated and freed by every batch
at the same sizes: it keeps them (`keep_compute_buffers`), as PyTorch's own caching allocators
do on a GPU, so its peak is one batch's activations on top of the weights it holds.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value
COMPUTE_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # the largest glibc takes (half its 64 MiB arena heap)
COMPUTE_TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024


HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"


def large_buffer_env(environ: dict | None = None) -> dict[str, str]:
    """Environment to add for a role process: huge pages for glibc's mmap'd buffers, unless the
    caller's GLIBC_TUNABLES already says something about glibc.malloc.hugetlb."""
    tunables = (os.environ if environ is None else environ).get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables or not sys.platform.startswith("linux"):
        return {}
    return {"GLIBC_TUNABLES": ":".join(t for t in (tunables, HUGETLB_TUNABLE) if t)}


def return_large_buffers_to_the_os() -> bool:
    """Fix glibc's mmap threshold (no-op elsewhere); True when it took effect."""
    return _mallopt((M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def keep_piece_buffers() -> bool:
    """For a shard: as `keep_compute_buffers` (a stage's pieces reuse the memory of pruned ones)."""
    return keep_compute_buffers()


def keep_compute_buffers() -> bool:
    """For a worker: buffers under 32 MiB come from the heap and freed heap memory is kept (up to
    256 MiB at its top), so a forward pass reuses the memory of the last one instead of mapping
    its activations afresh. With the 128 KiB threshold above, every activation of a batch was a
    new mapping: a MiniLM-sized encoder's compute thread took 36,000 page faults a second and
    spent a fifth of its CPU in the kernel (bench/text.py). No-op off glibc; True when both took."""
    return _mallopt((M_MMAP_THRESHOLD, COMPUTE_MMAP_THRESHOLD_BYTES), (M_TRIM_THRESHOLD, COMPUTE_TRIM_THRESHOLD_BYTES))


def _mallopt(*settings: tuple[int, int]) -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return all([bool(libc.mallopt(param, value)) for param, value in settings])
    except (OSError, AttributeError):  # not glibc (musl, macOS): their allocators behave differently
        return False
