"""fetch._Sink: downloaded chunks land byte for byte, whichever route each one takes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from mergebuild.remote.fetch import _Sink


def _piece(data: bytes, aligned: bool) -> bytes | memoryview:
    """A chunk as the download hands it over: bytes (through s3fs), or a view of a
    page-aligned receive buffer (a ranged GET received into it)."""
    if not aligned:
        return data
    import mmap

    buf = mmap.mmap(-1, max(len(data), 1))
    buf[: len(data)] = data
    return memoryview(buf)[: len(data)]


@pytest.mark.parametrize(
    ("chunk", "size", "start"),
    [
        (1 << 16, 5 * (1 << 16) + 777, 0),  # aligned chunks, an odd tail
        (1 << 16, 3 * (1 << 16), 1 << 16),  # a resumed download: it goes on from a chunk
        (10_000, 45_001, 0),  # not a page multiple: the first chunk's pages only
        (1 << 16, 100, 0),  # smaller than a page: only the buffered route
    ],
)
@pytest.mark.parametrize("aligned", [False, True])
def test_chunks_written_in_order_give_the_bytes(
    tmp_path: Path,
    chunk: int,
    size: int,
    start: int,
    monkeypatch: pytest.MonkeyPatch,
    aligned: bool,
) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "part"
    path.write_bytes(data[:start])  # what an earlier, cut-off download left
    fd = os.open(path, os.O_RDWR)
    try:
        sink = _Sink(fd, chunk)
        direct = sink.direct >= 0
        real, by_direct = os.pwrite, []

        def pwrite(f: int, view: memoryview, at: int) -> int:
            by_direct.append(f == sink.direct)
            return real(f, view, at)

        monkeypatch.setattr(os, "pwrite", pwrite)
        for at in range(start, size, chunk):
            sink.write(_piece(data[at : at + chunk], aligned), at, aligned)
        sink.close()
        sink.close()  # twice is harmless
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == data
    if not direct:
        pytest.skip("no O_DIRECT on this filesystem: only the buffered route ran")
    # whole pages at page offsets went direct; nothing else could
    pages = [at for at in range(start, size, chunk) if at % 4096 == 0 and size - at >= 4096]
    assert any(by_direct) == bool(pages)


@pytest.mark.parametrize("aligned", [False, True])
def test_a_disk_refusing_direct_writes_gets_them_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, aligned: bool
) -> None:
    """The first O_DIRECT write answers EINVAL (a disk wanting another alignment): the sink
    drops its direct route (closing its buffer mid-write) and every byte still lands."""
    import errno

    chunk, size = 1 << 16, 4 * (1 << 16) + 123
    data = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "part"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        sink = _Sink(fd, chunk)
        if sink.direct < 0:
            pytest.skip("no O_DIRECT on this filesystem")
        real, refused = os.pwrite, []

        def pwrite(f: int, view: memoryview, at: int) -> int:
            if f == sink.direct:
                refused.append(at)
                del view  # as the real call: it holds no reference once it has failed
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(f, view, at)

        monkeypatch.setattr(os, "pwrite", pwrite)
        for at in range(0, size, chunk):
            sink.write(_piece(data[at : at + chunk], aligned), at, aligned)
        sink.close()
        os.fsync(fd)
    finally:
        os.close(fd)
    assert refused == [0]  # refused once, then buffered from there on
    assert path.read_bytes() == data


@pytest.mark.parametrize("kind", ["bytes", "memoryview"])
@pytest.mark.parametrize("size", [100, 3 << 16])  # below and above GIL_FREE_COPY
def test_copy_into_copies_exactly_the_asked_prefix(kind: str, size: int) -> None:
    """The GIL-free copy of a download chunk (bytes, no numpy) and of a writer's piece: the
    first `length` bytes land at the offset, nothing else in the buffer changes."""
    import mmap

    from mergebuild.atomic import copy_into

    data = os.urandom(size)
    piece = data if kind == "bytes" else memoryview(bytearray(data))
    buf = mmap.mmap(-1, size + 8192)
    buf[:] = b"\xaa" * len(buf)
    copy_into(buf, 4096, piece, size - 7)
    assert buf[4096 : 4096 + size - 7] == data[: size - 7]
    assert buf[:4096] == b"\xaa" * 4096 and buf[4096 + size - 7 :] == b"\xaa" * (8192 - 4096 + 7)
    copy_into(buf, 0, piece)  # the whole piece
    assert buf[:size] == data
