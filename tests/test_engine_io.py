"""Engine I/O pieces that only change speed must not change what is read, computed or written:
the readahead asks for exactly the bytes the merge reads, direct (O_DIRECT) reads give the same
bytes as page-cache reads and fall back when they fail, tiled arithmetic equals numpy on the
same values, and a disk without room for the build is refused before anything is written."""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import EXAMPLES


def test_readahead_advises_exactly_the_bytes_the_merge_reads(
    workdir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergebuild.build import Builder
    from mergebuild.cache import CacheStore
    from mergebuild.engine import executor
    from mergebuild.engine.safetensors_io import SafetensorsSource
    from mergebuild.recipe import load_recipe

    monkeypatch.setattr(executor, "CHUNK_ELEMENTS", 4096)  # many chunked units
    monkeypatch.setenv("MERGEBUILD_READ", "buffered")  # the page-cache route: fadvise
    read: list[tuple[str, int, int]] = []
    advised: list[tuple[str, int, int]] = []
    names: dict[int, str] = {}
    real_read, real_open = SafetensorsSource.read_bytes, SafetensorsSource.__init__

    def opening(self: SafetensorsSource, path: Path, header: object = None) -> None:
        real_open(self, path, header)
        names[self.fd] = path.name

    def reading(self: SafetensorsSource, key: str, lo: int, hi: int):
        info, begin, _ = self.header.tensors[key]
        size = info.nbytes // max(1, int(np.prod(info.shape)))
        read.append((self.path.name, self.header.data_start + begin + lo * size, (hi - lo) * size))
        return real_read(self, key, lo, hi)

    real_fadvise = os.posix_fadvise

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        # the readahead's advice (a first build's hash tap asks for what it reads itself too)
        tap = threading.current_thread().name == "hash-tap"
        if advice == os.POSIX_FADV_WILLNEED and fd in names and not tap:
            advised.append((names[fd], offset, length))
        real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(SafetensorsSource, "__init__", opening)
    monkeypatch.setattr(SafetensorsSource, "read_bytes", reading)
    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    recipe = workdir / "seed.yaml"
    recipe.write_text((EXAMPLES / "anything_nsfw_gape.yaml").read_text())
    plan, _ = Builder(load_recipe(recipe), CacheStore(cache), jobs=2).run()
    assert [i.status for i in plan.items] == ["built"] * 3
    assert len(read) > 1000 and len({f for f, _, _ in read}) == 4
    assert sorted(advised) == sorted(read)  # every byte read was asked for ahead, nothing else
    assert len(advised) == len(set(advised))


def _build_seed(workdir: Path, cache: Path) -> bytes:
    from mergebuild.build import Builder
    from mergebuild.cache import CacheStore
    from mergebuild.recipe import load_recipe

    recipe = workdir / "seed.yaml"
    recipe.write_text((EXAMPLES / "anything_nsfw_gape.yaml").read_text())
    plan, _ = Builder(load_recipe(recipe), CacheStore(cache), jobs=2).run()
    assert [i.status for i in plan.items] == ["built"] * 3
    return (workdir / "out" / "anything-nsfw-gape.safetensors").read_bytes()


def test_direct_reads_give_the_same_file_as_page_cache_reads(
    workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergebuild.engine import executor, readahead

    monkeypatch.setattr(executor, "CHUNK_ELEMENTS", 4096)  # many chunked units
    monkeypatch.setattr(executor, "DIRECT_BUFFERS", 256 << 10)  # units wait for room, or skip it
    monkeypatch.setattr(readahead, "HEAD_BYTES", 64 << 10)  # the page-cache head, then direct
    direct: list[int] = []
    real_stop = readahead.Readahead.stop

    def stop(self: readahead.Readahead) -> None:
        real_stop(self)
        direct.append(self.direct_bytes)

    monkeypatch.setattr(readahead.Readahead, "stop", stop)
    monkeypatch.setenv("MERGEBUILD_READ", "buffered")
    buffered = _build_seed(workdir, tmp_path / "c1")
    assert direct == [0]
    monkeypatch.setenv("MERGEBUILD_READ", "direct")
    (workdir / "out" / "anything-nsfw-gape.safetensors").unlink()
    assert _build_seed(workdir, tmp_path / "c2") == buffered
    probe = os.open(workdir / "seed.yaml", os.O_RDONLY)
    twin = readahead.open_direct(probe)
    os.close(probe)
    if twin < 0:
        pytest.skip("no O_DIRECT here: both builds took the page-cache route")
    os.close(twin)
    models = sum(f.stat().st_size for f in (workdir / "models").glob("*.safetensors"))
    assert direct[1] > models // 2  # most input bytes came the direct way


def test_direct_reads_of_unaligned_ranges_and_their_fallbacks(tmp_path: Path) -> None:
    from mergebuild.engine.readahead import Readahead, open_direct

    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, 8 * 4096 + 777, dtype=np.uint8).tobytes()
    path = tmp_path / "blob"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    twin = open_direct(fd)
    if twin < 0:
        pytest.skip("no O_DIRECT on this filesystem")
    units = [
        [(fd, 5, 100), (fd, 4100, 5000)],  # aligned: 3 pages
        [(fd, 9200, 9000)],  # 3 pages
        [(fd, 20500, 12000)],  # 3 pages: no room while units 0 and 1 are held
        [(fd, 32500, len(data) - 32500)],  # ends in the file's last, partial page
    ]
    try:
        ra = Readahead(units, 0, {fd: twin}, buffer_bytes=8 * 4096, head=0).start()
        ra.advance(0)
        first = [ra.take(*r) for r in units[0]]
        assert [bytes(a) for a in first] == [data[5:105], data[4100:9100]]
        ra.advance(1)
        second = ra.take(*units[1][0])
        assert bytes(second) == data[9200:18200]
        ra.advance(2)  # the buffers are taken while those arrays live: unit 2 is left to its worker
        assert ra.take(*units[2][0]) is None
        del first, second
        ra.advance(3)  # room again; a short read at the end of the file is fine
        last = ra.take(*units[3][0])
        assert bytes(last) == data[32500:]
        del last
        ra.stop()
        assert ra.buffers is not None and ra.buffers.used == 0
        assert ra.direct_bytes > 0

        bad = os.open(path, os.O_WRONLY)  # reads on it fail: the caller reads the range itself
        ra = Readahead(units, 0, {fd: bad}, head=0).start()
        ra.advance(0)
        assert ra.take(*units[0][0]) is None
        ra.stop()
        os.close(bad)
    finally:
        os.close(twin)
        os.close(fd)


def test_units_too_large_for_direct_buffers_are_advised_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole tensor larger than half the direct buffers and than `huge_bytes` is read by its
    worker: the readahead advises it into the page cache ahead of time instead of leaving the
    disk idle. One of at most `huge_bytes` is read directly, one such unit at a time."""
    from mergebuild.engine import readahead

    path = tmp_path / "blob"
    path.write_bytes(bytes(64 * 4096))
    fd = os.open(path, os.O_RDONLY)
    twin = readahead.open_direct(fd)
    if twin < 0:
        pytest.skip("no O_DIRECT on this filesystem")
    advised: list[tuple[int, int]] = []
    other: list[tuple[int, int, int, int]] = []
    real = os.posix_fadvise

    def fadvise(f: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED:
            advised.append((offset, length))
        else:
            other.append((f, offset, length, advice))
        real(f, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    data = np.random.default_rng(5).integers(0, 256, 64 * 4096, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    units = [
        [(fd, 0, 4096)],
        [(fd, 4096, 40 * 4096)],  # too large for the buffers and for huge_bytes
        [(fd, 41 * 4096, 4096)],
        [(fd, 42 * 4096, 10 * 4096)],  # too large for the buffers, not for huge_bytes
        [(fd, 52 * 4096, 11 * 4096)],  # the same: read once the one before is let go
    ]
    try:
        ra = readahead.Readahead(
            units, 1 << 30, {fd: twin}, buffer_bytes=16 * 4096, head=0, huge_bytes=12 * 4096
        )
        ra.start()
        got = []
        for i in range(5):
            ra.advance(i)
            got.append(ra.take(*units[i][0]))
            if i >= 3:
                assert got[i] is not None  # read directly, one huge unit at a time
                assert bytes(got[i]) == data[units[i][0][1] : sum(units[i][0][1:])]
                got[i] = None  # let it go: the next huge unit can be read
        assert got[1] is None  # not read directly: its worker reads it
        assert bytes(got[2]) == data[41 * 4096 : 42 * 4096]
        got.clear()
        deadline = time.monotonic() + 10
        while not advised and time.monotonic() < deadline:  # the advising thread's pace
            time.sleep(0.01)
        ra.stop()
        assert advised == [(4096, 40 * 4096)]  # and only it went the page-cache way
        # ... with no kernel readahead past it: those bytes are read directly
        assert other == [(fd, 0, 0, os.POSIX_FADV_RANDOM)]
        assert ra.buffers is not None and ra.buffers.used == ra.buffers.huge_used == 0
    finally:
        os.close(twin)
        os.close(fd)


def test_small_units_are_batched_in_order_within_their_limits() -> None:
    """_batches: every unit once, in order; a unit of SMALL_UNIT elements or more alone; a
    batch of small ones stops at BATCH_ELEMENTS elements or `cap` bytes read."""
    import random

    from mergebuild.engine import executor
    from mergebuild.engine.compute import Unit

    rnd = random.Random(5)
    sizes = [rnd.choice([1, 100, 5000, 40_000, executor.SMALL_UNIT, 3 << 20]) for _ in range(400)]
    units = [Unit(f"k{i}", 0, n, True) for i, n in enumerate(sizes)]
    read = [2 * n for n in sizes]
    cap = 200_000
    batches = list(executor._batches(units, read, cap))
    assert [u for _, b in batches for u in b] == units
    at = 0
    for first, batch in batches:
        assert first == at and batch
        at += len(batch)
        if any(u.hi >= executor.SMALL_UNIT for u in batch):
            assert len(batch) == 1
        if len(batch) > 1:
            assert sum(read[first : first + len(batch)]) <= cap
            assert sum(u.hi for u in batch[:-1]) < executor.BATCH_ELEMENTS
    assert any(len(b) > 1 for _, b in batches)


def test_tiled_arithmetic_equals_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from mergebuild.engine import compute
    from mergebuild.engine.methods import REGISTRY

    monkeypatch.setattr(compute, "TILE_ELEMENTS", 1000)  # 7 tiles and a ragged end
    rng = np.random.default_rng(7)
    a, b, c = (rng.standard_normal((65, 101)).astype(np.float16) for _ in range(3))
    method = REGISTRY["add_difference"]
    params = method.Params(alpha=0.3)
    out, bad = compute._tiled(
        method, params, [torch.from_numpy(x) for x in (a, b, c)], torch.float16
    )
    f32 = np.float32
    want = (a.astype(f32) + (b.astype(f32) - c.astype(f32)) * f32(0.3)).astype(np.float16)
    assert out.shape == (65, 101) and not bad
    assert out.numpy().tobytes() == want.tobytes()
    b[40, 3] = np.inf  # in the 5th tile only
    _, bad = compute._tiled(method, params, [torch.from_numpy(x) for x in (a, b, c)], torch.float16)
    assert bad


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_nonfinite_check_on_sums_that_overflow(dtype: str) -> None:
    """The check sums in the tile's own dtype: a float16 sum beyond 65504 is a false alarm
    that the bit test must clear; one inf or NaN anywhere must always be found."""
    import torch

    from mergebuild.engine.compute import _has_nonfinite

    dt = getattr(torch, dtype)
    big = torch.full((300_000,), 60000.0 if dtype == "float16" else 3e38).to(dt)
    assert math.isinf(float(big.sum())) and not _has_nonfinite(big)
    for bad in (math.inf, -math.inf, math.nan):
        x = big.clone()
        x[123_457] = bad
        assert _has_nonfinite(x), bad
        assert _has_nonfinite(x[123_000:124_000].clone())
    assert not _has_nonfinite(torch.empty(0, dtype=dt))


@pytest.mark.parametrize(
    ("dtype", "bits", "nan"),
    [
        ("float16", np.uint16, 0x7E00),
        ("bfloat16", np.uint16, 0x7FC0),
        ("float32", np.uint32, 0x7FC00000),
        ("float64", np.uint64, 0x7FF8000000000000),
        ("float8_e5m2", np.uint8, 0x7E),
        ("float8_e4m3fn", np.uint8, 0x7F),
    ],
)
def test_nans_are_written_in_one_spelling(dtype: str, bits: type, nan: int) -> None:
    """canonical_nans: every NaN (either sign, any payload) becomes the dtype's positive
    quiet NaN; infinities, zeros of both signs and numbers keep their bits."""
    import torch

    from mergebuild.engine.compute import canonical_nans

    width = np.dtype(bits).itemsize * 8
    exp = {"float16": 5, "bfloat16": 8, "float32": 8, "float64": 11}.get(dtype)
    if exp is None:  # fp8: every byte, by its own rules (e4m3fn has no inf: S.1111.111 is NaN)
        pattern = np.arange(256, dtype=np.uint8)
        e, m = (5, 2) if dtype == "float8_e5m2" else (4, 3)
        exponent, mantissa = (pattern >> m) & ((1 << e) - 1), pattern & ((1 << m) - 1)
        is_nan = (
            (exponent == (1 << e) - 1) & (mantissa != 0)
            if dtype == "float8_e5m2"
            else (pattern & 0x7F) == 0x7F
        )
    else:  # numbers, ±0, ±inf, quiet and signalling NaNs of both signs, with payloads
        man = width - 1 - exp
        inf = ((1 << exp) - 1) << man
        sign = 1 << (width - 1)
        pattern = np.array(
            [0, sign, 1, inf - 1, inf, inf | sign, inf | 1, inf | (1 << (man - 1)),
             inf | sign | 1, inf | sign | (1 << (man - 1)) | 5, 0x3C, sign | 0x3C],
            dtype=bits,
        )  # fmt: skip
        is_nan = (pattern & (sign - 1)) > inf
    x = torch.from_numpy(pattern.copy()).view(getattr(torch, dtype))
    assert is_nan.sum() == {"float8_e5m2": 6, "float8_e4m3fn": 2}.get(dtype, 4)
    want = np.where(is_nan, np.array(nan, dtype=bits), pattern)
    got = canonical_nans(x, inplace=False)
    assert got.view(torch.uint8).numpy().view(bits).tolist() == want.tolist()
    assert x.view(torch.uint8).numpy().view(bits).tolist() == pattern.tolist()  # a copy
    canonical_nans(x, inplace=True)
    assert x.view(torch.uint8).numpy().view(bits).tolist() == want.tolist()


def test_build_that_cannot_fit_is_refused_before_writing(
    workdir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergebuild.build import Builder
    from mergebuild.cache import CacheStore
    from mergebuild.errors import BuildError
    from mergebuild.recipe import load_recipe

    recipe = workdir / "seed.yaml"
    recipe.write_text((EXAMPLES / "anything_nsfw_gape.yaml").read_text())
    real = os.fstatvfs

    def nearly_full(fd: int) -> os.statvfs_result:
        st = list(real(fd))
        st[4] = 10  # f_bavail: ten blocks
        return os.statvfs_result(st)

    writes = 0
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        nonlocal writes
        writes += 1
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "fstatvfs", nearly_full)
    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(BuildError, match="No space left on device: the build writes"):
        Builder(load_recipe(recipe), CacheStore(cache), jobs=2).run()
    assert writes == 0
    assert not list(cache.rglob(".mergebuild-tmp-*"))
    assert not (workdir / "out").exists() or not any((workdir / "out").iterdir())


def test_writers_of_one_pass_share_the_blocks_in_flight() -> None:
    """A pass writing many files (a sweep's members) gives each fewer queued blocks and write
    threads: what they hold together stays bounded whatever the member count, and a single
    file keeps the full queue."""
    from mergebuild.engine import stream_writer

    assert stream_writer.shares(1) == (stream_writer.QUEUED_BLOCKS, stream_writer.WRITE_THREADS)
    for n in range(1, 200):
        queued, threads = stream_writer.shares(n)
        assert queued >= 1 and threads >= 1
        total = stream_writer.ALL_QUEUED + stream_writer.ALL_THREADS
        assert n * (queued + threads) <= max(total, 2 * n)  # one of each per file at least
