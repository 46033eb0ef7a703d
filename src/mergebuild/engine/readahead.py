"""Keep the disk streaming: fetch input bytes a bounded window ahead of the merge.

Before the first tensor is computed, the fused pass knows every byte range it will read and in
which order. This module walks that list ahead of the merge, in one of two ways per input file:

- **Cached files** (most of the file already in the page cache, e.g. just hashed, or a rebuild):
  `posix_fadvise(WILLNEED)` on each range, up to `window` bytes ahead; the workers then `pread`
  from memory. Where the file is not cached this also works, the kernel reading with a deep
  queue on all inputs at once, but every page it reads is a fresh page-cache page: on this VM
  that cost 3-8 s of system CPU per 8 GB read (the merge needs that CPU) and it evicts whatever
  the user had cached.
- **Uncached files**: read with O_DIRECT by a few threads, 4 MiB requests in flight at once,
  into private buffers that the merge uses without copying (except the pass's first GiB,
  read as above while torch is being imported). Measured on 8.4 GB of cold inputs:
  0.3-0.4 s of system CPU instead of 4-8 s, at the same or a higher rate (1.3-2.0 against
  0.8-1.3 GB/s in the same minutes); the two-step SD1 recipe went from 8.8-9.5 s to 5.5-6.2 s.
  The window here is memory the process holds, so it is small.

Only the timing and the route of reads change, never the bytes: a range that cannot be read
directly (no O_DIRECT, an I/O error, a short read) is left to the worker's own `pread`, which
reports the error as it always did.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import threading
import weakref
from collections.abc import Sequence
from typing import Any

MAX_WINDOW = 3 << 30
# Memory for direct reads: bytes read ahead plus those of the units being merged. Measured on
# SD1 with interleaved cold runs: 64 MB left the merge waiting for reads; 96 and 128 MB were
# equally fast within the noise (two-step 6.6-7.0 s against 6.9-7.2 s), 128 MB held 40 MB more.
DIRECT_BUFFERS = 96 << 20
# The first GiB goes through the page cache even from cold files: the merge cannot start before
# torch is imported (about a second), and the direct buffers would fill in milliseconds, then
# leave the disk idle; the page cache has room to read ahead all that time. Interleaved cold SD1
# runs: single 4.2-4.4 s against 5.2 s without it, two-step 5.6-5.8 s against 6.8 s; 512 MiB
# was in between, 2 GiB no better.
HEAD_BYTES = 1 << 30
DIRECT_REQUEST = 4 << 20  # the largest single request this disk queue takes (max_sectors_kb)
DIRECT_THREADS = 16  # one request in flight each
ALIGN = 4096  # O_DIRECT offsets, lengths, buffers: a multiple of any disk's logical block
CACHED_ENOUGH = 0.5  # a file at least this resident in the page cache is read buffered
SYS_CACHESTAT = 451  # Linux >= 6.5, same number on every architecture


def default_window() -> int:
    """1 GiB of page cache ahead of the merge, less on a machine with little memory to spare."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return max(64 << 20, min(MAX_WINDOW, int(line.split()[1]) * 1024 // 4))
    except (OSError, ValueError, IndexError):
        pass
    return 256 << 20


class _CacheStat(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recently_evicted")
    ]


class _CacheStatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


def cached_fraction(fd: int) -> float | None:
    """Share of the file's pages in the page cache (the `cachestat` syscall); None if unknown."""
    try:
        size = os.fstat(fd).st_size
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if size == 0:
        return 1.0
    stat, rng = _CacheStat(), _CacheStatRange(0, 0)
    if libc.syscall(SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(stat), 0) != 0:
        return None  # older kernel or not Linux
    return min(1.0, stat.cache * os.sysconf("SC_PAGE_SIZE") / size)


def read_mode(fd: int) -> str:
    """ "direct" for a file mostly outside the page cache, else "buffered".

    `MERGEBUILD_READ=direct|buffered` forces one route (tests, benchmarks)."""
    forced = os.environ.get("MERGEBUILD_READ", "auto")
    if forced in ("direct", "buffered"):
        return forced
    frac = cached_fraction(fd)
    return "direct" if frac is not None and frac < CACHED_ENOUGH else "buffered"


def open_direct(fd: int, flags: int = os.O_RDONLY) -> int:
    """A second descriptor on `fd`'s file opened with O_DIRECT, or -1 where there is none."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag or not os.path.exists(f"/proc/self/fd/{fd}"):
        return -1
    try:
        return os.open(f"/proc/self/fd/{fd}", flags | flag)
    except OSError:
        return -1  # e.g. tmpfs before Linux 6.6


def _aligned(ranges: Sequence[tuple[int, int, int]]) -> int:
    """Bytes of direct-read buffer the (fd, offset, length) ranges need, ALIGN-aligned."""
    return sum(-(-(off + n) // ALIGN) * ALIGN - off // ALIGN * ALIGN for _, off, n in ranges if n)


class _BufferBudget:
    """A budget of `size` bytes for direct-read buffers: one region per unit, in unit order.

    A region is given back when the last array viewing it dies (a weakref finalizer on the
    array that owns the memory: numpy makes it the base of every slice, and torch.from_numpy
    keeps that slice alive), whatever order the units finish in. The memory itself comes from
    malloc, which reuses freed blocks (engine/tuning.py): reading into one fixed mmap ring
    instead was measured 25% slower here (1.5 against 2.0 GB/s, same requests)."""

    def __init__(self, size: int) -> None:
        import numpy as np

        self.np = np
        self.size = size
        self.used = 0
        self.huge_used = 0
        self.lock = threading.Lock()

    def alloc(self, n: int, huge: bool = False) -> Any | None:
        """An aligned uint8 region of `n` bytes (a multiple of ALIGN), or None if no room now.
        `huge`: a unit too large for the budget, counted apart: one at a time."""
        with self.lock:
            if huge:
                if self.huge_used:
                    return None
                self.huge_used += n
            elif self.used + n > self.size:
                return None
            else:
                self.used += n
        raw = self.np.empty(n + ALIGN, dtype=self.np.uint8)
        pad = -raw.ctypes.data % ALIGN
        region = raw[pad : pad + n]
        weakref.finalize(raw, self._release, n, huge)
        return region

    def _release(self, n: int, huge: bool) -> None:
        with self.lock:
            if huge:
                self.huge_used -= n
            else:
                self.used -= n


class _Fetch:
    """One range read directly: its aligned bytes in `array`, filled by `parts` requests."""

    __slots__ = ("array", "done", "failed", "length", "parts", "skip", "start")

    def __init__(self, array: Any, start: int, skip: int, length: int, parts: int) -> None:
        self.array, self.start, self.skip, self.length = array, start, skip, length
        self.parts = parts  # requests not yet finished
        self.failed = False
        self.done = threading.Event()


class Readahead:
    """`units[i]` lists the (fd, offset, length) ranges unit i reads; `advance(i)` says unit i
    is being worked on; `take(fd, offset, length)` hands over a directly read range.

    Ranges on a descriptor in `direct` (fd → its O_DIRECT twin) are read into buffers of at most
    `buffer_bytes`, whole units ahead while there is room; the others are advised at most `window`
    bytes ahead. A unit that finds no room when it starts is read by its worker as usual. A unit
    needing more than half the buffers (a whole-tensor method's key) is read directly on its
    own, one at a time, if it needs at most `huge_bytes`; else advised and read by its worker."""

    def __init__(
        self,
        units: Sequence[Sequence[tuple[int, int, int]]],
        window: int,
        direct: dict[int, int] | None = None,
        buffer_bytes: int = DIRECT_BUFFERS,
        head: int | None = None,  # default: HEAD_BYTES, at most `window`
        huge_bytes: int = 0,
    ) -> None:
        self.units, self.window, self.direct = units, window, direct or {}
        self.buffer_bytes = buffer_bytes
        self.buffers: _BufferBudget | None = None
        self.ends: list[int] = []  # bytes through unit i, cumulative
        total = 0
        for ranges in units:
            total += sum(n for _, _, n in ranges)
            self.ends.append(total)
        # units before this one take the page-cache route on every file (see HEAD_BYTES)
        head = min(HEAD_BYTES, window) if head is None else head
        self.first_direct = next((i for i, end in enumerate(self.ends) if end > head), len(units))
        self.consumed = 0
        self.stopping = False
        self.cond = threading.Condition()
        self.threads: list[threading.Thread] = []
        # direct reads: ranges issued by the driver (start, advance), in unit order
        self.fetches: dict[tuple[int, int, int], _Fetch] = {}
        self.next_unit = self.first_direct
        # units too large for the direct buffers (whole tensors of a whole-tensor method, say):
        # their workers read them, so they take the page-cache route ahead of time instead
        self.huge = {
            i
            for i, ranges in enumerate(units)
            if _aligned([r for r in ranges if r[0] in self.direct]) > buffer_bytes // 2
        }
        # ... except those of at most `huge_bytes`: read directly one at a time, outside the
        # budget (the worker would hold them anyway); the page cache costs CPU (module doc)
        self.huge_direct = {
            i
            for i in self.huge
            if _aligned([r for r in units[i] if r[0] in self.direct]) <= huge_bytes
        }
        self.huge_advised = self.huge - self.huge_direct
        self.requests: queue.SimpleQueue[tuple[_Fetch, int, int, int] | None] = queue.SimpleQueue()
        self.direct_bytes = 0  # read with O_DIRECT, for tests and the curious

    def start(self) -> Readahead:
        if not (self.ends and self.ends[-1]):
            return self
        # Files read directly get no kernel readahead on their page-cache descriptor: its reads
        # (the head, whole tensors too large to read directly) are advised range by range
        # already, and readahead past those ranges read bytes the direct route then read
        # again. SD1 ties read 9.45 GB for 8.53 GB of inputs, add_cosine_a 4.50 for 4.27 GB;
        # now exactly the inputs. (The advice is per open file: other readers are unaffected.)
        for fd in self.direct:
            with contextlib.suppress(OSError, AttributeError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        if hasattr(os, "posix_fadvise") and (
            self.first_direct > 0
            or self.huge_advised
            or any(fd not in self.direct for ranges in self.units for fd, _, _ in ranges)
        ):
            self.threads.append(threading.Thread(target=self._advise, name="readahead"))
        if self.direct:
            self.buffers = _BufferBudget(self.buffer_bytes)
            self.threads += [
                threading.Thread(target=self._read_direct, name="direct-read")
                for _ in range(DIRECT_THREADS)
            ]
            self._issue()
        for t in self.threads:
            t.daemon = True
            t.start()
        return self

    def advance(self, unit: int) -> None:
        with self.cond:
            self.consumed = max(self.consumed, self.ends[unit - 1] if unit else 0)
            self.cond.notify()
        if self.direct:
            self.next_unit = max(self.next_unit, unit)  # units already started: their own reads
            self._issue()
            self.next_unit = max(self.next_unit, unit + 1)

    def take(self, fd: int, offset: int, length: int) -> Any | None:
        """The bytes of a directly read range as a numpy uint8 array (waits for the read), or
        None: not read directly, or the read failed and the caller should read it itself."""
        with self.cond:
            fetch = self.fetches.pop((fd, offset, length), None)
        if fetch is None:
            return None
        fetch.done.wait()
        if fetch.failed:
            return None
        return fetch.array[fetch.skip : fetch.skip + length]

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        for _ in range(DIRECT_THREADS if self.direct else 0):
            self.requests.put(None)
        for t in self.threads:
            t.join()
        self.fetches.clear()

    # -- page cache route ---------------------------------------------------------------------

    def _advise(self) -> None:
        issued = 0
        for i, ranges in enumerate(self.units):
            for fd, offset, length in ranges:
                if fd in self.direct and i >= self.first_direct and i not in self.huge_advised:
                    continue
                with self.cond:
                    while not self.stopping and issued - self.consumed > self.window:
                        self.cond.wait()
                    if self.stopping:
                        return
                try:
                    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
                except OSError:
                    return  # an optimisation only: the workers' own reads still happen
                issued += length

    # -- direct route -------------------------------------------------------------------------

    def _issue(self) -> None:
        """Queue the direct reads of the next units, in order, while the buffer budget has room.

        Runs on the driver thread only, so a unit's ranges are registered before its worker
        can ask for them."""
        assert self.buffers is not None
        while self.next_unit < len(self.units):
            spans = []  # (fd, twin, offset, length, aligned start, aligned end)
            for fd, offset, length in self.units[self.next_unit]:
                twin = self.direct.get(fd)
                if twin is not None and length:
                    lo = offset // ALIGN * ALIGN
                    spans.append(
                        (fd, twin, offset, length, lo, -(-(offset + length) // ALIGN) * ALIGN)
                    )
            need = sum(hi - lo for *_, lo, hi in spans)
            if self.next_unit in self.huge and self.next_unit not in self.huge_direct:
                self.next_unit += 1
                continue
            region = self.buffers.alloc(need, self.next_unit in self.huge) if need else None
            if need and region is None:
                return  # no room until earlier units are merged; retried at the next advance
            at = 0
            for fd, twin, offset, length, lo, hi in spans:
                array = region[at : at + hi - lo]
                at += hi - lo
                starts = range(lo, hi, DIRECT_REQUEST)
                fetch = _Fetch(array, lo, offset - lo, length, len(starts))
                with self.cond:
                    self.fetches[(fd, offset, length)] = fetch
                for s in starts:
                    self.requests.put((fetch, twin, s - lo, min(DIRECT_REQUEST, hi - s)))
            self.next_unit += 1

    def _read_direct(self) -> None:
        while (item := self.requests.get()) is not None:
            fetch, twin, at, n = item
            got = -1
            try:
                if not fetch.failed and not self.stopping:
                    got = os.preadv(twin, [memoryview(fetch.array)[at : at + n]], fetch.start + at)
            except Exception:  # whatever went wrong, the worker reads the range itself
                got = -1
            finally:
                # a short read is fine only at the end of the file, past the range's bytes
                ok = got == n or (got >= 0 and at + got >= fetch.skip + fetch.length)
                with self.cond:
                    self.direct_bytes += max(got, 0) if ok else 0
                    fetch.failed = fetch.failed or not ok
                    fetch.parts -= 1
                    if fetch.parts == 0:  # never left waiting: take() would hang
                        fetch.done.set()
            del item, fetch  # holding it while idle would keep its buffer from reuse
