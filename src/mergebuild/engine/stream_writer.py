"""Write one safetensors file whose layout is known up front, tensors arriving in any order.

The file is assembled in aligned blocks (4 MiB) in memory and each complete block is written by
background threads with O_DIRECT, bypassing the page cache. Why: copying into fresh page-cache
pages cost more CPU than the merge arithmetic here (writing 2 GB buffered: 0.4-4.9 s of CPU,
depending on the VM's memory state; with O_DIRECT: 0.06 s, and 3x the throughput), and the CPU
is needed for the merge. Where O_DIRECT is unavailable (some filesystems, other systems) the
same blocks are written buffered and their writeback is started at once.

Blocks complete roughly in file order, because the merge visits keys in file order; the xxh3 of
the data section is computed block by block as they complete, so the cache never reads the file
back. The header is hashed apart (cache.SplitChecksum): a build that learns its inputs' hashes
only at the end (build/speculate.py) rewrites the header last, and its checksum stays valid.
Pieces arriving far ahead of the rest (a writer fed in an unrelated key order) would need many
staged blocks: past MAX_STAGED_BYTES their blocks are written in place, buffered, and the
checksum is left to the cache. Bytes on disk are the same either way.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import xxhash

from mergebuild.atomic import copy_into, pwrite_all
from mergebuild.engine.arrays import NP_NAMES, is_array
from mergebuild.engine.dtypes import ITEMSIZE, to_torch
from mergebuild.engine.readahead import ALIGN, open_direct
from mergebuild.engine.safetensors_io import TensorInfo, layout
from mergebuild.hashing import SplitChecksum

if TYPE_CHECKING:
    import torch

# 4 MiB: the largest request this disk queue takes (max_sectors_kb). 8 MiB blocks were no faster
# (interleaved cold SD1 two-step runs: 6.55-6.76 s against 6.46-6.72 s) and held 50 MB more.
BLOCK_BYTES = max(ALIGN, int(os.environ.get("MERGEBUILD_WRITE_BLOCK", 4 << 20)) // ALIGN * ALIGN)
MAX_STAGED_BYTES = 256 << 20
QUEUED_BLOCKS = 4  # complete blocks waiting for the disk; more makes the merge wait
# Writes in flight per file: one O_DIRECT write at a time reached only ~0.65 GB/s here
# while the inputs were being read; a few at once keep the disk's queue full.
WRITE_THREADS = 3
# ... shared out when a pass writes many files (a sweep's members): each file's queue and
# writes in flight hold blocks, and 9 files at 4 + 3 each held 0.25 GB once the merge
# outran the disk (SD1 sweep of 9: peak 0.94 GB). The disk's queue is full either way.
ALL_QUEUED, ALL_THREADS = 12, 9


def shares(files: int) -> tuple[int, int]:
    """(queued blocks, write threads) for each of `files` writers of one pass."""
    n = max(files, 1)
    return max(1, min(QUEUED_BLOCKS, ALL_QUEUED // n)), max(1, min(WRITE_THREADS, ALL_THREADS // n))


class _Block:
    __slots__ = ("buf", "filled", "hashed", "index", "size", "written")

    def __init__(self, index: int, size: int, buf: mmap.mmap) -> None:
        self.index, self.size, self.buf = index, size, buf
        self.filled = 0
        self.written = self.hashed = False


class StreamingWriter:
    """`write()` from any thread; `finish()` once every tensor is written; `close()` always."""

    def __init__(
        self,
        fd: int,
        infos: dict[str, TensorInfo],
        metadata: dict[str, str],
        start: bool = True,
        share: tuple[int, int] = (QUEUED_BLOCKS, WRITE_THREADS),
    ) -> None:
        self.fd = fd
        self.infos = infos
        self.head, self.offsets = layout(infos, metadata)
        self.data_start = len(self.head)
        self.total = self.data_start + sum(i.nbytes for i in infos.values())
        self.missing = {k: i.nbytes for k, i in infos.items()}  # bytes not yet written
        self._nblocks = -(-self.total // BLOCK_BYTES)
        self._lock = threading.Lock()
        self._blocks: dict[int, _Block] = {}
        self._in_place: set[int] = set()  # blocks written buffered, piece by piece
        self._pool: list[mmap.mmap] = []
        self._hash: xxhash.xxh3_128 | None = xxhash.xxh3_128()  # of the data section
        self._hashed = 0  # blocks hashed so far (in order)
        self._queue: queue.Queue[_Block | None] = queue.Queue(share[0])
        self._n_threads = share[1]
        self._error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._direct = -1
        self._use_direct = False
        self._writeback: Callable[[int, int, int], None] | None = None
        if start:
            self.start()

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        os.ftruncate(self.fd, self.total)
        self._direct = open_direct(self.fd, os.O_WRONLY)
        self._use_direct = self._direct >= 0
        self._writeback = None if self._use_direct else _sync_file_range()
        self._threads = [
            threading.Thread(target=self._drain, name="writer", daemon=True)
            for _ in range(self._n_threads)
        ]
        for t in self._threads:
            t.start()
        self._put(0, memoryview(self.head))

    # -- filling blocks ---------------------------------------------------------------------

    def write(self, key: str, tensor: torch.Tensor, lo: int = 0) -> int:
        """Write `tensor` (or a numpy array) as flat elements starting at element `lo` of
        `key`; returns bytes."""
        info = self.infos[key]
        size = ITEMSIZE[info.dtype]
        if is_array(tensor):
            import numpy as np

            flat = np.ascontiguousarray(tensor).reshape(-1)
            fits = flat.dtype.name == NP_NAMES.get(info.dtype)
            count, raw = flat.size, flat.view(np.uint8)
        else:
            import torch

            data = tensor.detach().cpu().contiguous().reshape(-1)
            fits = to_torch(info.dtype) == data.dtype
            count, raw = data.numel(), data.view(torch.uint8).numpy()
        if (lo + count) * size > info.nbytes or not fits:
            raise ValueError(f"{key}: {tensor.dtype}[{count}] at {lo} does not fit {info}")
        n = count * size
        if n:
            start = self.data_start + self.offsets[key] + lo * size
            self._put(start, memoryview(raw))
        with self._lock:
            self.missing[key] -= n
        return n

    def _put(self, pos: int, view: memoryview) -> None:
        complete: list[_Block] = []
        while len(view):
            index = pos // BLOCK_BYTES
            offset = pos - index * BLOCK_BYTES
            n = min(len(view), self._block_size(index) - offset)
            with self._lock:
                if self._error is not None:
                    raise self._error
                block = self._block(index)
            # the bytes are copied outside the lock: pieces of one block are disjoint, and a
            # block is not released before all its bytes are counted in (filled == size)
            if block is None:
                pwrite_all(self.fd, view[:n], pos)
            else:
                copy_into(block.buf, offset, view[:n])
                with self._lock:
                    block.filled += n
                    if block.filled == block.size:
                        complete.append(block)
                        self._hash_ready()
            view, pos = view[n:], pos + n
        for block in complete:  # outside the lock: a full queue makes this worker wait
            self._queue.put(block)

    def _block_size(self, index: int) -> int:
        return min(BLOCK_BYTES, self.total - index * BLOCK_BYTES)

    def _block(self, index: int) -> _Block | None:
        """The staging block `index`, new if need be; None: write this piece in place."""
        block = self._blocks.get(index)
        if block is not None or index in self._in_place:
            return block
        if len(self._blocks) * BLOCK_BYTES >= MAX_STAGED_BYTES and index != self._hashed:
            self._in_place.add(index)
            self._hash = None  # the cache will hash the finished file instead
            return None
        buf = self._pool.pop() if self._pool else mmap.mmap(-1, BLOCK_BYTES)
        block = self._blocks[index] = _Block(index, self._block_size(index), buf)
        return block

    def _hash_ready(self) -> None:
        """Hash complete blocks in file order (called with the lock held)."""
        while True:
            if self._hashed in self._in_place:  # (the hash is abandoned already)
                self._hashed += 1
                continue
            block = self._blocks.get(self._hashed)
            if block is None or block.filled != block.size:
                return
            if self._hash is not None:
                skip = max(0, self.data_start - block.index * BLOCK_BYTES)  # header: apart
                if skip < block.size:
                    self._hash.update(memoryview(block.buf)[skip : block.size])
            block.hashed = True
            self._hashed += 1
            self._release(block)

    def _release(self, block: _Block) -> None:
        if block.written and block.hashed:
            del self._blocks[block.index]
            self._pool.append(block.buf)

    # -- the disk side ------------------------------------------------------------------------

    def _drain(self) -> None:
        while (block := self._queue.get()) is not None:
            try:
                if self._error is None:
                    self._write_block(block)
            except BaseException as e:  # reported by the next write, or by finish()
                self._error = e
            with self._lock:
                block.written = True
                self._release(block)

    def _write_block(self, block: _Block) -> None:
        pos = block.index * BLOCK_BYTES
        if self._use_direct:
            padded = -(-block.size // ALIGN) * ALIGN  # the tail block: cut by finish()
            try:
                if os.pwrite(self._direct, memoryview(block.buf)[:padded], pos) == padded:
                    return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
            with self._lock:  # this disk wants other alignment: go buffered from here on
                self._use_direct = False
                self._writeback = _sync_file_range()
        pwrite_all(self.fd, memoryview(block.buf)[: block.size], pos)
        if self._writeback is not None:
            self._writeback(self.fd, pos, block.size)

    # -- completion ---------------------------------------------------------------------------

    def finish(self) -> None:
        """Wait for the disk writes, check that every byte arrived; raise a write error."""
        self._stop_threads()
        if self._error is not None:
            raise self._error
        short = [k for k, n in self.missing.items() if n]
        if short or self._blocks:
            raise AssertionError(f"{len(short)} tensors were not fully written, e.g. {short[:1]}")
        os.ftruncate(self.fd, self.total)  # drop the padding of the last direct write
        self.close()

    def close(self) -> None:
        """Stop the writer thread and free the blocks (also after an error)."""
        if self._error is None:
            self._error = RuntimeError("writer closed")  # the thread skips what is queued
        self._stop_threads()
        if self._direct >= 0:
            os.close(self._direct)
            self._direct = -1
        for buf in [*self._pool, *(b.buf for b in self._blocks.values())]:
            with contextlib.suppress(BufferError):  # a view may outlive us in a traceback
                buf.close()
        self._pool, self._blocks = [], {}

    def _stop_threads(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        self._threads = []

    def body_digest(self) -> str | None:
        """xxh3-128 of the data section, if every block went through the running hash."""
        if self._hash is None or self._hashed != self._nblocks:
            return None
        return self._hash.hexdigest()

    def checksum(self) -> SplitChecksum | None:
        """The file's checksum as the cache records it, if the writer could compute it."""
        body = self.body_digest()
        return None if body is None else SplitChecksum.of(self.head, body)


def check_space(writers: list[StreamingWriter]) -> None:
    """Refuse to start when the files cannot fit, rather than fail at 90%; raises ENOSPC.

    A best-effort check (other writers may fill the disk meanwhile; then a write fails with
    ENOSPC and the build still cleans up), counting every file bound for the same filesystem.
    """
    need: dict[int, tuple[int, int]] = {}  # st_dev → (bytes, an fd on it)
    for w in writers:
        dev = os.fstat(w.fd).st_dev
        total, _ = need.get(dev, (0, w.fd))
        need[dev] = (total + w.total, w.fd)
    for total, fd in need.values():
        st = os.fstatvfs(fd)
        free = st.f_bavail * st.f_frsize
        if total > free:
            raise OSError(
                errno.ENOSPC,
                f"No space left on device: the build writes {total / 1e9:.2f} GB, "
                f"{free / 1e9:.2f} GB are free",
            )


def _sync_file_range() -> Callable[[int, int, int], None] | None:
    """`(fd, offset, length) → start writeback of that range` (Linux); None elsewhere.

    SYNC_FILE_RANGE_WRITE only queues the dirty pages: unlike fdatasync it neither waits for
    the disk nor forces a journal commit, so the final fsync finds little left to do.
    """
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]

    def start(fd: int, offset: int, length: int) -> None:
        fn(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE; errors resurface at fsync

    return start
