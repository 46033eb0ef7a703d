"""Input hashes read with O_DIRECT (files outside the page cache) equal hashlib's and
xxhash's over the whole file, at every size around the read chunk, and the route is the one
the file's cache state asks for."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import xxhash

from mergebuild import hashing
from mergebuild.engine.readahead import open_direct

C = hashing.CHUNK


def _model(tmp_path: Path, data: bytes, route: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`data` as a file, hashed by `route` ("direct": skipped where O_DIRECT is unavailable)."""
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    monkeypatch.setenv("MERGEBUILD_READ", route)
    if route == "direct":
        fd = os.open(path, os.O_RDONLY)
        twin = open_direct(fd)
        os.close(fd)
        if twin < 0:
            pytest.skip("no O_DIRECT on this filesystem")
        os.close(twin)
    return path


@pytest.mark.parametrize(
    "size", [0, 1, 4095, C - 1, C, C + 1, hashing.LEGACY_OFFSET + 7, 5 * C + 12345]
)
def test_direct_hashes_equal_the_libraries_over_the_whole_file(
    size: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = _model(tmp_path, data, "direct", monkeypatch)
    reads: list[int] = []
    real = os.preadv

    def preadv(fd: int, bufs: list, offset: int) -> int:  # type: ignore[type-arg]
        reads.append(offset)
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    got = hashing.hash_file(path)
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    assert got.xxh3 == xxhash.xxh3_128_hexdigest(data)
    legacy = data[hashing.LEGACY_OFFSET : hashing.LEGACY_OFFSET + hashing.LEGACY_SIZE]
    assert got.legacy == hashlib.sha256(legacy).hexdigest()[:8]
    assert got.size == size
    assert sorted(reads) == list(range(0, size, C))  # every chunk read directly, once
    assert hashing.hash_file(path, full=False).xxh3 == got.xxh3


def test_a_cached_file_is_hashed_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(3 * C + 5)
    path = _model(tmp_path, data, "buffered", monkeypatch)
    monkeypatch.setattr(os, "preadv", None)  # the direct route would call it
    assert hashing.hash_file(path).sha256 == hashlib.sha256(data).hexdigest()


def test_a_failing_direct_read_falls_back_to_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(2 * C + 5)
    path = _model(tmp_path, data, "direct", monkeypatch)

    def broken(fd: int, bufs: list, offset: int) -> int:  # type: ignore[type-arg]
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "preadv", broken)
    assert hashing.hash_file(path).sha256 == hashlib.sha256(data).hexdigest()
