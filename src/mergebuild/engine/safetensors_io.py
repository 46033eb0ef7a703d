"""safetensors reading and streaming writing, tensor by tensor.

Reading: the header is parsed and checked here (bounds, overlaps, sizes, dtypes) before any
tensor is touched, so a hostile or truncated file is refused with a precise message and no
large allocation; tensors are then read with `pread` into a fresh buffer, one at a time.

Writing (stream_writer.py) uses `layout`: every tensor's shape and dtype is known before
merging starts, so offsets are fixed up front and match `safetensors.torch.save_file` for the
same tensors and metadata.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mergebuild.engine.arrays import NP_NAMES
from mergebuild.engine.dtypes import ITEMSIZE, RANK, to_torch
from mergebuild.errors import BuildError

if TYPE_CHECKING:
    import numpy as np
    import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
MAX_RANK = 64
INT64_LIMIT = 1 << 63


def shape_problem(shape: object, itemsize: int) -> str | None:
    """Why `shape` cannot be a tensor torch can hold, or None. torch sizes, strides and byte
    counts are int64: a zero-size tensor with a dimension of 2**70 has 0 bytes and matches its
    offsets, yet overflows (with C++ frames) the moment torch builds it."""
    if not isinstance(shape, (list, tuple)):
        return f"has an invalid shape {str(shape)[:80]} (not a list)"
    if len(shape) > MAX_RANK:
        return f"has {len(shape)} dimensions (limit {MAX_RANK})"
    span = itemsize
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d < INT64_LIMIT:
            return f"has an invalid shape {str(list(shape))[:120]} (dimension {str(d)[:40]})"
        span *= max(d, 1)  # torch's contiguous strides multiply sizes of at least 1
        if span >= INT64_LIMIT:
            return f"has a shape too large for any tensor {str(list(shape))[:120]}"
    return None


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors name, e.g. "F16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class Header:
    tensors: dict[str, tuple[TensorInfo, int, int]]  # name → (info, begin, end) in data section
    metadata: dict[str, str]
    data_start: int


# Headers parsed in this process, by file identity: one build asks for each input's header
# several times (planning, provenance, LoRA detection, opening), 5 ms each for SD1's 1100 keys.
_HEADERS: OrderedDict[tuple[str, int, int, int, int, int], Header] = OrderedDict()
_HEADERS_LOCK = threading.Lock()
HEADER_MEMO = 64


def read_header(path: Path) -> Header:
    """Parse and validate a safetensors header; raise BuildError naming the defect.

    A file whose path, inode, size, mtime and ctime are unchanged since its header was parsed
    gets that result again (any write changes the ctime); the returned Header is shared, and
    nothing modifies one."""
    try:
        st = os.stat(path)
    except OSError:
        return _parse_header(path)  # reports it
    key = (os.fspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _HEADERS_LOCK:
        hit = _HEADERS.get(key)
    if hit is not None:
        return hit
    header = _parse_header(path)
    with _HEADERS_LOCK:
        _HEADERS[key] = header
        while len(_HEADERS) > HEADER_MEMO:
            _HEADERS.popitem(last=False)
    return header


def _parse_header(path: Path) -> Header:
    """read_header without the memo."""

    def bad(why: str) -> BuildError:
        return BuildError(f"{path}: not a valid safetensors file: {why}")

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise bad("file is shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise bad(f"header claims {n} bytes (limit {MAX_HEADER_BYTES})")
            if 8 + n > size:
                raise bad(f"header claims {n} bytes but the file has {size - 8} after the length")
            raw = f.read(n)
    except OSError as e:
        raise BuildError(f"cannot read {path}: {e.strerror}") from None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"header is not valid JSON ({e})") from None
    except RecursionError:
        raise bad("header JSON is nested too deeply") from None
    if not isinstance(doc, dict):
        raise bad("header is not a JSON object")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise bad("__metadata__ must map strings to strings")
    data_len = size - 8 - n
    tensors: dict[str, tuple[TensorInfo, int, int]] = {}
    for text in [*doc, *meta, *meta.values()]:
        try:
            text.encode("utf-8")  # JSON escapes can smuggle lone surrogates into names
        except UnicodeEncodeError:
            raise bad(f"name {text[:80]!r} is not valid Unicode") from None
    for name, entry in doc.items():
        if not isinstance(entry, dict):
            raise bad(f"entry for '{name}' is not an object")
        dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in ITEMSIZE:
            raise bad(f"tensor '{name}' has unknown dtype {dtype!r}")
        why = shape_problem(shape, ITEMSIZE[dtype])
        if why or not isinstance(shape, list):
            raise bad(f"tensor '{name}' {why or 'has an invalid shape (not a list)'}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise bad(f"tensor '{name}' has invalid data_offsets {offs!r}")
        begin, end = offs
        info = TensorInfo(dtype, tuple(shape))
        if not 0 <= begin <= end <= data_len:
            raise bad(
                f"tensor '{name}' lies outside the file (offsets {begin}..{end}, "
                f"data section is {data_len} bytes; truncated?)"
            )
        if end - begin != info.nbytes:
            raise bad(
                f"tensor '{name}' is {end - begin} bytes but {dtype}{list(shape)} needs "
                f"{info.nbytes}"
            )
        tensors[name] = (info, begin, end)
    cursor = 0
    for name, (_, begin, end) in sorted(tensors.items(), key=lambda t: (t[1][1], t[1][2])):
        if begin != cursor:
            what = "overlaps the previous tensor" if begin < cursor else "leaves a gap"
            raise bad(f"tensor '{name}' {what} (offset {begin}, expected {cursor})")
        cursor = end
    if cursor != data_len:
        raise bad(f"data section is {data_len} bytes but tensors cover {cursor} (truncated?)")
    return Header(tensors, meta, 8 + n)


def _pread_into(fd: int, buf: object, offset: int) -> None:
    view = memoryview(buf)
    while view:
        got = os.preadv(fd, [view], offset)
        if got == 0:
            raise BuildError("file ended early while reading a tensor (was it truncated?)")
        view, offset = view[got:], offset + got


class SafetensorsSource:
    """A safetensors file opened for tensor-by-tensor reads."""

    def __init__(self, path: Path, header: Header | None = None) -> None:
        self.path = path
        self.header = header if header is not None else read_header(path)
        self.fd = os.open(path, os.O_RDONLY)

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def infos(self) -> dict[str, TensorInfo]:
        return {k: v[0] for k, v in self.header.tensors.items()}

    def read(self, key: str) -> torch.Tensor:
        info = self.header.tensors[key][0]
        return self.read_flat(key, 0, math.prod(info.shape)).reshape(info.shape)

    def byte_range(self, key: str, lo: int, hi: int) -> tuple[int, int, int]:
        """(fd, file offset, length) that `read_flat(key, lo, hi)` reads: for readahead."""
        info, begin, _ = self.header.tensors[key]
        size = ITEMSIZE[info.dtype]
        return self.fd, self.header.data_start + begin + lo * size, (hi - lo) * size

    def read_flat(self, key: str, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of the flattened tensor, as the merge sees them (`decode`)."""
        return self.decode(key, self.read_stored(key, lo, hi))

    def decode(self, key: str, stored: torch.Tensor) -> torch.Tensor:
        """The values a merge sees from the stored ones: the same here (scaled_fp8.py differs)."""
        return stored

    def read_stored(self, key: str, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) as stored in the file, read straight into a new tensor."""
        return self.stored_from(key, self.read_bytes(key, lo, hi))

    @property
    def plain(self) -> bool:
        """Values are the stored ones (no `decode`): a numpy-only pass may read them."""
        return type(self).decode is SafetensorsSource.decode

    def read_bytes(self, key: str, lo: int, hi: int) -> np.ndarray:
        """Elements [lo, hi) as stored, their bytes in a new numpy uint8 array."""
        import numpy as np

        info, begin, _ = self.header.tensors[key]
        size = ITEMSIZE[info.dtype]
        # numpy's allocator asks for transparent huge pages from 4 MiB: a large read buffer
        # is faulted in 2 MiB at a time instead of 4 KiB
        out = np.empty((hi - lo) * size, dtype=np.uint8)
        if hi > lo:
            try:
                _pread_into(self.fd, out, self.header.data_start + begin + lo * size)
            except OSError as e:
                raise BuildError(f"cannot read {self.path}: {e.strerror}") from None
        return out

    def array_from(self, key: str, data: np.ndarray) -> np.ndarray:
        """`tensor_from` as a numpy array (numpy dtypes only, arrays.NP_NAMES): shared, unless
        the bytes' address does not suit the element size."""
        import numpy as np

        dt = np.dtype(NP_NAMES[self.header.tensors[key][0].dtype])
        if data.__array_interface__["data"][0] % dt.itemsize:
            data = data.copy()
        return data.view(dt)

    def stored_from(self, key: str, data: np.ndarray) -> torch.Tensor:
        """A flat tensor of `key`'s stored dtype over bytes already read (a numpy uint8
        array), shared rather than copied unless their address does not suit the element
        size."""
        import torch

        st = self.header.tensors[key][0].dtype
        if not data.size:  # torch will not view an empty byte tensor (its stride is 0) as wider
            return torch.empty(0, dtype=to_torch(st))
        raw = torch.from_numpy(data)
        if raw.data_ptr() % ITEMSIZE[st]:
            raw = raw.clone()
        return raw.view(to_torch(st))

    def tensor_from(self, key: str, data: np.ndarray) -> torch.Tensor:
        """`stored_from`, as the merge sees the values (`decode`)."""
        return self.decode(key, self.stored_from(key, data))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def layout(infos: dict[str, TensorInfo], metadata: dict[str, str] | None) -> tuple[bytes, dict]:
    """Header bytes and name → data offset, exactly as safetensors' `save_file` lays them out."""
    order = sorted(infos, key=lambda k: (-RANK[infos[k].dtype], k))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offsets, cursor = {}, 0
    for k in order:
        info = infos[k]
        offsets[k] = cursor
        header[k] = {
            "dtype": info.dtype,
            "shape": list(info.shape),
            "data_offsets": [cursor, cursor + info.nbytes],
        }
        cursor += info.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets
