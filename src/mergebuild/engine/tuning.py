"""Process-wide settings for the duration of a merge, each measured on full-size SD1.

- Freed tensor memory stays in the process (glibc). A merge allocates and frees the same few
  buffer sizes tens of thousands of times; glibc's defaults hand multi-megabyte blocks back to
  the kernel on free, so the next chunk page-faults its buffers in afresh: 0.5-3 million faults
  and 2-5 s of system time per build, varying run to run. With a fixed mmap threshold and a
  high trim threshold they are reused (about 50 000 faults). Peak memory is unchanged: it is
  bounded by the tensors in flight (`--max-memory`). The exception: after a whole-tensor unit
  of a large key (all its inputs held at once), `release_freed_memory` hands the freed blocks
  back. Kept, they were cut up by the next keys' smaller allocations and SD1 ties peaked at
  1.0-1.15 GB; released, 0.83-0.88 GB, ~3% slower (the reads that follow fault their pages in
  as huge pages, see safetensors_io.read_bytes).
- OpenBLAS (loaded with numpy, which the merge uses only for buffer views) gets one thread:
  its idle pool otherwise spins on the cores the merge workers need.
- No cyclic garbage collection during the pass: the merge creates many short-lived objects
  and no cycles, and the collector's scans cost about 6% of the CPU time.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
from collections.abc import Iterator

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit; larger blocks are still mmapped
TRIM_THRESHOLD = 1 << 30

_malloc_tuned = False


def _libc(name: str) -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        return getattr(ctypes.CDLL(None), name)  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None  # not glibc


_malloc_trim = _libc("malloc_trim")


def keep_freed_memory() -> None:
    global _malloc_tuned
    if _malloc_tuned or not sys.platform.startswith("linux"):
        return
    _malloc_tuned = True
    mallopt = _libc("mallopt")
    if mallopt is None:
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def release_freed_memory() -> None:
    """Give the memory freed in glibc's arenas back to the kernel (nothing elsewhere)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


@contextlib.contextmanager
def merging() -> Iterator[None]:
    """The settings above, for one fused pass (gc is restored afterwards)."""
    keep_freed_memory()
    if "numpy" not in sys.modules:  # read when numpy loads OpenBLAS; later it has no effect
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()
