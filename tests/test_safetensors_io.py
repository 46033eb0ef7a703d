"""The streaming writer against safetensors' own save_file, and header validation."""

from __future__ import annotations

import os
import struct
from dataclasses import astuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergebuild.engine.dtypes import from_torch
from mergebuild.engine.safetensors_io import TensorInfo, read_header
from mergebuild.engine.stream_writer import StreamingWriter
from mergebuild.errors import BuildError


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "b.weight": torch.randn(3, 5, generator=g).half(),
        "a.weight": torch.randn(4, 4, generator=g),
        "pos": torch.arange(77)[None],
        "z.empty": torch.zeros(0),
        "bf": torch.randn(6, generator=g).bfloat16(),
        "scalar": torch.tensor(3, dtype=torch.int32),
        "u8": torch.arange(5, dtype=torch.uint8),
        "d": torch.randn(2, generator=g).double(),
        "bool": torch.tensor([True, False]),
    }


@pytest.mark.parametrize("metadata", [None, {"mergebuild": '{"json": true, "é": "ü"}'}])
def test_streaming_writer_equals_save_file(tmp_path: Path, metadata: dict | None) -> None:
    ts = tensors()
    save_file(ts, str(tmp_path / "ref.safetensors"), metadata=metadata)
    infos = {k: TensorInfo(from_torch(t.dtype), tuple(t.shape)) for k, t in ts.items()}
    fd = os.open(tmp_path / "ours.safetensors", os.O_CREAT | os.O_WRONLY)
    w = StreamingWriter(fd, infos, metadata or {})
    for k in reversed(list(ts)):  # any order
        w.write(k, ts[k])
    w.finish()
    os.close(fd)
    ours = (tmp_path / "ours.safetensors").read_bytes()
    assert ours == (tmp_path / "ref.safetensors").read_bytes()


def test_multiple_metadata_entries_sorted_not_hash_ordered(tmp_path: Path) -> None:
    """save_file emits __metadata__ in Rust HashMap order, which varies between runs; we sort
    the entries (deterministic output) and otherwise match it byte for byte."""
    import json

    ts = tensors()
    meta = {"z": "1", "a": "2", "é": "3", "m": "4"}
    save_file(ts, str(tmp_path / "ref.safetensors"), metadata=meta)
    infos = {k: TensorInfo(from_torch(t.dtype), tuple(t.shape)) for k, t in ts.items()}
    fd = os.open(tmp_path / "ours.safetensors", os.O_CREAT | os.O_WRONLY)
    w = StreamingWriter(fd, infos, meta)
    for k, t in ts.items():
        w.write(k, t)
    w.finish()
    os.close(fd)
    ours, ref = (
        (tmp_path / "ours.safetensors").read_bytes(),
        (tmp_path / "ref.safetensors").read_bytes(),
    )
    n = struct.unpack("<Q", ours[:8])[0]
    assert len(ours) == len(ref) and ours[8 + n :] == ref[8 + n :]
    assert json.loads(ours[8 : 8 + n]) == json.loads(ref[8 : 8 + n])
    assert list(json.loads(ours[8 : 8 + n])["__metadata__"]) == sorted(meta)


def corrupt(tmp_path: Path, mutate) -> Path:
    p = tmp_path / "x.safetensors"
    save_file(tensors(), str(p))
    data = bytearray(p.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header, body = bytes(data[8 : 8 + n]), bytes(data[8 + n :])
    p.write_bytes(mutate(header, body))
    return p


def hdr(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


CASES = {
    "truncated data": (lambda h, b: hdr(h) + b[:-3], "truncated"),
    "header longer than file": (lambda h, b: struct.pack("<Q", 10_000) + h, "header claims"),
    "huge header": (lambda h, b: struct.pack("<Q", 1 << 60) + h, "limit"),
    "invalid json": (lambda h, b: hdr(h[:-10] + b"}}}}}}}}}}") + b, "not valid JSON"),
    "unknown dtype": (lambda h, b: hdr(h.replace(b'"F32"', b'"F33"', 1)) + b, "unknown dtype"),
    "size mismatch": (lambda h, b: hdr(h.replace(b"[4,4]", b"[4,5]")) + b, "needs"),
    "out of bounds": (lambda h, b: hdr(h) + b[:8], "outside the file"),
    "too short": (lambda h, b: b"\x01\x02", "shorter than"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_invalid_headers_are_refused(tmp_path: Path, case: str) -> None:
    mutate, expect = CASES[case]
    p = corrupt(tmp_path, mutate)
    with pytest.raises(BuildError, match=expect):
        read_header(p)


def test_overlapping_offsets_refused(tmp_path: Path) -> None:
    import json

    p = tmp_path / "o.safetensors"
    h = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    text = json.dumps(h).encode()
    p.write_bytes(hdr(text) + bytes(12))
    with pytest.raises(BuildError, match="overlaps"):
        read_header(p)


def test_running_checksum_equals_file_hash_in_any_write_order(tmp_path: Path) -> None:
    """Tensors and chunks written out of order: the writer's xxh3 is the finished file's."""
    import random

    g = torch.Generator().manual_seed(0)
    ts = {f"t{i}": torch.randn(37 * (i + 1), generator=g).half() for i in range(6)}
    infos = {k: TensorInfo("F16", tuple(v.shape)) for k, v in ts.items()}
    pieces = [(k, lo) for k, v in ts.items() for lo in range(0, v.numel(), 10)]
    random.Random(1).shuffle(pieces)
    path = tmp_path / "out.safetensors"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        w = StreamingWriter(fd, infos, {"m": "x"})
        for k, lo in pieces:
            w.write(k, ts[k][lo : lo + 10], lo)
        w.finish()
        assert astuple(w.checksum()) == split_checksum(path.read_bytes())
    finally:
        os.close(fd)


def big_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {f"t{i:02d}": torch.randn(1000 + 777 * i, generator=g).half() for i in range(24)}


def write_pieces(
    path: Path, ts: dict[str, torch.Tensor], order: str, step: int = 500, threads: int = 1
) -> StreamingWriter:
    """`ts` written by pieces of `step` elements in `order`, dealt out to `threads` threads."""
    import random
    import threading

    infos = {k: TensorInfo("F16", tuple(v.shape)) for k, v in ts.items()}
    pieces = [(k, lo) for k, v in ts.items() for lo in range(0, v.numel(), step)]
    if order == "reversed":
        pieces.reverse()
    elif order == "shuffled":
        random.Random(1).shuffle(pieces)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with StreamingWriter(fd, infos, {"m": "x"}) as w:

            def feed(share: list[tuple[str, int]]) -> None:
                for k, lo in share:
                    w.write(k, ts[k][lo : lo + step], lo)

            if threads == 1:  # in this thread: a write error reaches the caller as raised
                feed(pieces)
            else:
                shares = [pieces[i::threads] for i in range(threads)]
                feeders = [threading.Thread(target=feed, args=(share,)) for share in shares]
                for t in feeders:
                    t.start()
                for t in feeders:
                    t.join()
            w.finish()
    finally:
        os.close(fd)
    return w


@pytest.mark.parametrize("order", ["in order", "reversed", "shuffled"])
@pytest.mark.parametrize("staged", ["plenty", "scarce"])
def test_block_writer_bytes_and_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, order: str, staged: str
) -> None:
    """Many 4 KiB blocks, fed in order or not; with few staged blocks allowed, pieces far ahead
    are written in place: same bytes, and then no running checksum (the cache hashes)."""

    from mergebuild.engine import stream_writer

    monkeypatch.setattr(stream_writer, "BLOCK_BYTES", 4096)
    if staged == "scarce":
        monkeypatch.setattr(stream_writer, "MAX_STAGED_BYTES", 3 * 4096)
    ts = big_tensors()
    save_file(ts, str(tmp_path / "ref.safetensors"), metadata={"m": "x"})
    w = write_pieces(tmp_path / "ours.safetensors", ts, order)
    ours = (tmp_path / "ours.safetensors").read_bytes()
    assert ours == (tmp_path / "ref.safetensors").read_bytes()
    assert len(ours) > 50 * 4096
    if staged == "scarce" and order != "in order":
        assert w.checksum() is None
    else:
        assert astuple(w.checksum()) == split_checksum(ours)


@pytest.mark.parametrize("staged", ["plenty", "scarce"])
def test_block_writer_fed_by_threads_copies_outside_its_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, staged: str
) -> None:
    """Four threads write shuffled pieces at once, every piece through the GIL-free copy
    (outside the writer's lock): the file and its running checksum are exact."""

    from mergebuild import atomic
    from mergebuild.engine import stream_writer

    monkeypatch.setattr(stream_writer, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(atomic, "GIL_FREE_COPY", 0)
    if staged == "scarce":
        monkeypatch.setattr(stream_writer, "MAX_STAGED_BYTES", 3 * 4096)
    copies = 0
    real = stream_writer.copy_into

    def counted(buf, offset, piece):  # type: ignore[no-untyped-def]
        nonlocal copies
        copies += 1
        real(buf, offset, piece)

    monkeypatch.setattr(stream_writer, "copy_into", counted)
    ts = big_tensors()
    save_file(ts, str(tmp_path / "ref.safetensors"), metadata={"m": "x"})
    path = tmp_path / "ours.safetensors"
    w = write_pieces(path, ts, "shuffled", step=300, threads=4)
    pieces = sum(-(-v.numel() // 300) for v in ts.values())
    ours = path.read_bytes()
    assert ours == (tmp_path / "ref.safetensors").read_bytes()
    if staged == "plenty":
        assert copies > pieces // 2
        assert astuple(w.checksum()) == split_checksum(ours)
    else:
        assert copies > 0  # pieces far ahead were written in place


def test_block_writer_falls_back_when_direct_io_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that wants another alignment answers O_DIRECT writes with EINVAL: the writer
    continues buffered, and the file is still exact."""
    import errno

    from mergebuild.engine import stream_writer

    monkeypatch.setattr(stream_writer, "BLOCK_BYTES", 8192)
    direct_writes = 0
    real = os.pwrite

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        nonlocal direct_writes
        if os.get_blocking(fd) and fcntl_flags(fd) & getattr(os, "O_DIRECT", 0):
            direct_writes += 1
            if direct_writes > 2:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    ts = big_tensors()
    save_file(ts, str(tmp_path / "ref.safetensors"), metadata={"m": "x"})
    write_pieces(tmp_path / "ours.safetensors", ts, "in order")
    assert (tmp_path / "ours.safetensors").read_bytes() == (
        tmp_path / "ref.safetensors"
    ).read_bytes()
    if hasattr(os, "O_DIRECT"):
        assert direct_writes >= 3  # two direct blocks, then refusals (writers run in parallel)


def fcntl_flags(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


def test_block_writer_reports_a_disk_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC in the writer thread surfaces in the caller, as the OSError it was."""
    import errno

    from mergebuild.engine import stream_writer

    monkeypatch.setattr(stream_writer, "BLOCK_BYTES", 4096)
    calls = 0
    real = os.pwrite

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OSError, match="No space left on device"):
        write_pieces(tmp_path / "ours.safetensors", big_tensors(), "in order")


def split_checksum(data: bytes) -> tuple[int, str, str]:
    """xxh3-128 of the header (8-byte length + JSON) and of the data section, apart."""
    import xxhash

    head = 8 + int.from_bytes(data[:8], "little")
    return (head, xxhash.xxh3_128_hexdigest(data[:head]), xxhash.xxh3_128_hexdigest(data[head:]))
