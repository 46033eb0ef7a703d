"""Keep the disk streaming: ask the kernel for input bytes a bounded window ahead of the merge.

Before the first tensor is computed, the fused pass knows every byte range it will read and in
which order. A thread walks that list and calls `posix_fadvise(WILLNEED)` on each range once
the merge is within `window` bytes of it. The kernel then reads with a deep queue on all inputs
at once (measured here: 2.7-3.0 GB/s against 1.5-2.4 GB/s for the same 4 MB reads issued one by
one), the workers find their data in the page cache, and the disk is already busy while torch
is being imported. Only the timing of reads changes; the bytes read are the same.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

MAX_WINDOW = 3 << 30


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


class Readahead:
    """`units[i]` lists the (fd, offset, length) ranges unit i reads; `advance(i)` says unit i
    is being worked on. The thread stays at most `window` bytes ahead of the latest unit."""

    def __init__(self, units: Sequence[Sequence[tuple[int, int, int]]], window: int) -> None:
        self.units, self.window = units, window
        self.ends: list[int] = []  # bytes through unit i, cumulative
        total = 0
        for ranges in units:
            total += sum(n for _, _, n in ranges)
            self.ends.append(total)
        self.consumed = 0
        self.stopping = False
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None

    def start(self) -> Readahead:
        if hasattr(os, "posix_fadvise") and self.ends and self.ends[-1]:
            self.thread = threading.Thread(target=self._loop, name="readahead", daemon=True)
            self.thread.start()
        return self

    def advance(self, unit: int) -> None:
        with self.cond:
            self.consumed = max(self.consumed, self.ends[unit - 1] if unit else 0)
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join()

    def _loop(self) -> None:
        issued = 0
        for ranges in self.units:
            for fd, offset, length in ranges:
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
