"""Hash an input file from the bytes a merge reads anyway, so a first build reads it once.

The hashes (xxh3 key, SHA-256, legacy) need the file's bytes in file order, from the first byte
to the last. The merge reads most of them, in its own order (the output's key order, chunks
finishing out of order with `-j`), and skips some (the header, keys no output wants). A tap
receives every range the merge reads (`feed`, from any worker thread) and hashes on its own
thread: ranges arriving at the hash cursor are hashed at once, ranges ahead of it wait in a
bounded stash, and bytes the merge will never read (gaps between its planned ranges) are read
by the tap itself, through the page cache. A range that finds the stash full is dropped and
read again by the tap when the cursor gets there: only then is a byte read twice.

Fed bytes are the merge's own buffers (small ranges are copied, to be batched): the engine
never modifies a tensor it read in place (methods work on float32 copies, methods/base.f32),
so hashing them later is safe.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import queue
import threading
from collections.abc import Sequence
from typing import Any

from mergebuild.hashing import CHUNK, FileHashes, StreamHasher

# Ranges that arrived ahead of the hash cursor, held until it gets there. With -j2 and 8 MB
# units the stash holds a few units; a file whose tensor order differs from the output's
# would hold much more, and past this its ranges are read again instead.
STASH_BYTES = 64 << 20
# Bytes fed but not yet taken by the tap's thread: past this, `feed` waits (the merge must not
# outrun the hashing with buffers the tap still holds; SHA-256 is the slower of the two).
QUEUE_BYTES = 32 << 20
# Ranges below this are copied and handed to the tap's thread in batches of about this many
# bytes: one wake-up (and GIL hand-off) per range costs more than hashing a small tensor.
BATCH_BYTES = 1 << 20
OWN_AHEAD = 32 << 20  # bytes the tap's own reads ask for ahead of themselves


class HashTap:
    """`feed(offset, data)` from any thread; `finish()` once the merge is done; `close()`."""

    def __init__(
        self, fd: int, size: int, planned: Sequence[tuple[int, int]], stash: int = STASH_BYTES
    ) -> None:
        self.fd, self.size, self.stash_cap = fd, size, stash
        self.hasher = StreamHasher()
        self.cursor = 0
        # the merge's planned ranges, sorted and merged: [start, end) the tap waits for
        spans: list[list[int]] = []
        for off, n in sorted((o, n) for o, n in planned if n > 0):
            if spans and off <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], off + n)
            else:
                spans.append([off, off + n])
        self.starts = [s for s, _ in spans]
        self.ends = [e for _, e in spans]
        self.stash: dict[int, Any] = {}  # offset → bytes arrived ahead of the cursor
        self.stashed = 0
        self.dropped: list[tuple[int, int]] = []  # ranges to read again: the stash was full
        self.queue: queue.SimpleQueue[list[tuple[int, Any]] | None] = queue.SimpleQueue()
        self.queued = 0  # bytes in `queue`
        self.pending: list[tuple[int, Any]] = []  # small ranges not queued yet (BATCH_BYTES)
        self.pending_bytes = 0
        self.room = threading.Condition()
        self.stopped = False  # the thread ended: feeders never wait
        self.error: BaseException | None = None
        self.finishing = False
        self.abort = False
        self.thread = threading.Thread(target=self._run, name="hash-tap", daemon=True)
        self.thread.start()

    def feed(self, offset: int, data: Any) -> None:
        """The merge read `data` (bytes-like) at `offset` of the file; waits while the tap
        is more than QUEUE_BYTES behind."""
        n = len(memoryview(data).cast("B"))
        if not n:
            return
        if n < BATCH_BYTES:
            small = bytes(memoryview(data).cast("B"))  # a copy: the read buffer is freed now
            with self.room:
                self.pending.append((offset, small))
                self.pending_bytes += n
                if self.pending_bytes < BATCH_BYTES:
                    return
                batch, n = self._take_pending()
        else:  # the small ranges held so far go first: the cursor may be waiting for them
            with self.room:
                batch, held = self._take_pending()
            batch.append((offset, data))
            n += held
        self._put(batch, n)

    def _take_pending(self) -> tuple[list[tuple[int, Any]], int]:
        batch, n = self.pending, self.pending_bytes
        self.pending, self.pending_bytes = [], 0
        return batch, n

    def _put(self, batch: list[tuple[int, Any]], n: int) -> None:
        with self.room:
            while self.queued and self.queued + n > QUEUE_BYTES and not self.stopped:
                self.room.wait()
            if self.stopped:
                return  # failed (finish() reports it) or closed: nothing to hash any more
            self.queued += n
        self.queue.put(batch)

    def finish(self) -> FileHashes:
        """The file's hashes: waits for the tap to hash what is left (reading what it must)."""
        with self.room:
            batch, n = self._take_pending()
        if batch:
            self._put(batch, n)
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.hasher.result()

    def close(self) -> None:
        """Stop without a result (the build failed)."""
        if self.thread.is_alive():
            self.abort = True
            self.queue.put(None)
            self.thread.join()
        self.stash.clear()
        self.pending.clear()

    # -- the tap's thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                self._advance()
                if self.abort:
                    return
                batch = self.queue.get()
                if batch is None:
                    self.finishing = True
                    self._advance()
                    return
                n = 0
                for offset, data in batch:
                    n += self._take(offset, data)
                    self._advance()
                del batch, data  # the merge's buffers are not held past this
                with self.room:
                    self.queued -= n
                    self.room.notify_all()
        except BaseException as e:  # reported by finish()
            self.error = e
        finally:
            with self.room:
                self.stopped = True
                self.room.notify_all()
            self.stash.clear()
            self.pending.clear()
            while True:  # release whatever the merge queued meanwhile
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    break

    def _take(self, offset: int, data: Any) -> int:
        """Hash, stash or drop one fed range; returns its length."""
        view = memoryview(data).cast("B")
        end = offset + len(view)
        if end <= self.cursor:
            pass  # already hashed (a second name for the same file reads it again)
        elif offset <= self.cursor:
            self._hash(view[self.cursor - offset :])
        elif offset not in self.stash and self.stashed + len(view) <= self.stash_cap:
            self.stash[offset] = view
            self.stashed += len(view)
        elif offset not in self.stash:
            self.dropped.append((offset, end))
        return len(view)

    def _advance(self) -> None:
        """Hash from the cursor as far as the bytes at hand (and the tap's own reads) go."""
        while self.cursor < self.size and not self.abort:
            held = self._stashed_at(self.cursor)
            if held is not None:
                self._hash(held)
                continue
            i = bisect.bisect_right(self.starts, self.cursor) - 1
            inside = i >= 0 and self.cursor < self.ends[i]
            if not inside:  # a gap the merge never reads: read it here
                nxt = self.starts[i + 1] if i + 1 < len(self.starts) else self.size
                self._read_own(min(nxt, self.size))
            elif self.finishing or self._dropped_at(self.cursor):
                self._read_own(self.ends[i])  # not coming (again)
            else:
                return  # wait for the merge to read it

    def _stashed_at(self, pos: int) -> memoryview | None:
        """The stashed bytes from `pos` on (dropping stashed ranges the cursor passed)."""
        view = self.stash.pop(pos, None)
        if view is not None:  # the usual case: the next range starts at the cursor
            self.stashed -= len(view)
            return view
        found = None
        for off in list(self.stash):
            view = self.stash[off]
            if off + len(view) <= pos:
                del self.stash[off]
                self.stashed -= len(view)
            elif off <= pos and found is None:
                del self.stash[off]
                self.stashed -= len(view)
                found = view[pos - off :]
        return found

    def _dropped_at(self, pos: int) -> bool:
        self.dropped = [(lo, hi) for lo, hi in self.dropped if hi > pos]
        return any(lo <= pos for lo, _ in self.dropped)

    def _read_own(self, end: int) -> None:
        """Read and hash [cursor, end) from the file (what the merge skips, or was dropped).

        Its reads are asked for ahead (WILLNEED, OWN_AHEAD bytes at a time): the descriptor
        may have the kernel's readahead turned off (readahead.Readahead.start)."""
        buf = bytearray(min(CHUNK, max(end - self.cursor, 1)))
        advised = self.cursor
        while self.cursor < end and not self.abort:
            if advised < min(end, self.cursor + OWN_AHEAD // 2) and hasattr(os, "posix_fadvise"):
                upto = min(end, self.cursor + OWN_AHEAD)
                with contextlib.suppress(OSError):
                    os.posix_fadvise(self.fd, advised, upto - advised, os.POSIX_FADV_WILLNEED)
                advised = upto
            want = memoryview(buf)[: min(len(buf), end - self.cursor)]
            n = os.preadv(self.fd, [want], self.cursor)
            if n <= 0:
                raise OSError(f"file ended at byte {self.cursor}, expected {self.size} bytes")
            self._hash(memoryview(buf)[:n])

    def _hash(self, view: memoryview) -> None:
        self.hasher.update(view)
        self.cursor += len(view)
