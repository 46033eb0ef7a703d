"""Zip-format torch checkpoints read by byte range with `pread`, never memory-mapped.

`torch.save` writes a zip archive: `<prefix>/data.pkl` (the object tree, storages referenced by
key) and one member `<prefix>/data/<key>` per storage. Mapping members into memory turned a
file that shrinks during a build into SIGBUS, and a compressed, truncated or overlapping member
into silently wrong tensors. So here the archive's structure is checked first (every member's
local header agrees with the central directory; data lies inside the file and overlaps no other
member; a storage member's declared size is exactly its storage's size), the pickle is
unpickled with torch's weights-only unpickler onto meta-device storages (shapes, strides and
offsets, no data), and tensor bytes are read with `pread` when a tensor is used. A short read
names the file instead of returning other bytes.

Compressed members (a checkpoint re-zipped by hand; torch.save never compresses) are decompressed
by zipfile, bounded by their declared size and CRC-checked, one member at a time: torch.load
reads them too, so they are not refused, but the whole member is held in memory while in use,
so a member above COMPRESSED_MEMBER_CAP is refused with a message saying how to fix it.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import struct
import sys
import threading
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergebuild.engine.dtypes import ITEMSIZE, from_torch, to_torch
from mergebuild.engine.safetensors_io import TensorInfo, shape_problem
from mergebuild.errors import BuildError

if TYPE_CHECKING:
    import torch

PICKLE_CAP = 256 * 1024 * 1024  # data.pkl holds names and numbers only: a few MB at most
COMPRESSED_MEMBER_CAP = 1 << 30  # a compressed storage is held whole in memory while in use
# what torch's own zip reader (miniz) reads; bzip2 or lzma members are no torch checkpoint
SUPPORTED_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}
METHOD_NAMES = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma"}
_LOCAL = struct.Struct("<4s5H3L2H")  # local file header, 30 bytes
_LOCAL_SIG = b"PK\x03\x04"


@dataclass(frozen=True)
class Member:
    name: str
    data_offset: int  # where the member's (possibly compressed) bytes start in the file
    size: int  # uncompressed size declared by the central directory
    compressed: bool
    info: zipfile.ZipInfo


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's elements live: a storage member, plus torch's view geometry."""

    info: TensorInfo
    member: Member
    storage_offset: int  # in elements
    stride: tuple[int, ...]
    contiguous: bool


class ZipArchive:
    """The checked structure of a zip checkpoint, with bounded reads of its members."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.fd = self.file.fileno()
        self._lock = threading.Lock()
        self._unpacked: tuple[str, bytes] | None = None  # last decompressed member
        try:
            self.zf = zipfile.ZipFile(self.file)
            self.members = self._check_members()
        except BuildError:
            self.close()
            raise
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error) as e:
            self.close()
            raise BuildError(f"{path}: not a readable torch checkpoint ({e})") from None
        names = list(self.members)
        self.prefix = names[0].split("/", 1)[0] if names else ""

    def bad(self, why: str) -> BuildError:
        return BuildError(f"{self.path}: not a valid torch checkpoint: {why}")

    def _check_members(self) -> dict[str, Member]:
        infos = self.zf.infolist()
        counts = Counter(i.filename for i in infos)
        dup = [n for n, c in counts.items() if c > 1]
        if dup:
            raise self.bad(f"member {dup[0][:120]!r} appears {counts[dup[0]]} times")
        size = os.fstat(self.fd).st_size
        end_of_data = min(self.zf.start_dir, size)
        members: dict[str, Member] = {}
        spans = []
        for info in infos:
            m = self._member(info)
            end = m.data_offset + info.compress_size
            if end > end_of_data:
                raise self.bad(
                    f"member {info.filename[:120]!r} ends at byte {end}, beyond the end of "
                    f"the member data ({end_of_data}; truncated?)"
                )
            if not m.compressed and info.compress_size != info.file_size:
                raise self.bad(
                    f"member {info.filename[:120]!r} is stored uncompressed but declares "
                    f"{info.compress_size} bytes in the file and {info.file_size} uncompressed"
                )
            spans.append((info.header_offset, end, info.filename))
            members[info.filename] = m
        spans.sort()
        for (_, end, name), (start, _, nxt) in itertools.pairwise(spans):
            if start < end:
                raise self.bad(
                    f"members {name[:120]!r} and {nxt[:120]!r} overlap (a truncated or crafted zip)"
                )
        return members

    def _member(self, info: zipfile.ZipInfo) -> Member:
        """Read and check `info`'s local header against the central directory."""
        raw = os.pread(self.fd, _LOCAL.size, info.header_offset)
        if len(raw) < _LOCAL.size or raw[:4] != _LOCAL_SIG:
            raise self.bad(f"member {info.filename[:120]!r} has no local header at its offset")
        _, _, flags, method, _, _, crc, csize, usize, nlen, xlen = _LOCAL.unpack(raw)
        name = os.pread(self.fd, nlen, info.header_offset + _LOCAL.size)
        local = name.decode("utf-8" if flags & 0x800 else "cp437", "replace")
        if local != info.orig_filename:
            raise self.bad(
                f"member {info.filename[:120]!r} is named {local[:120]!r} in its local header"
            )
        if flags & 0x1 or info.flag_bits & 0x1:
            raise self.bad(f"member {info.filename[:120]!r} is encrypted")
        if method != info.compress_type:
            raise self.bad(
                f"member {info.filename[:120]!r} has compression method {method} in its local "
                f"header but {info.compress_type} in the central directory"
            )
        if info.compress_type not in SUPPORTED_METHODS:
            method_name = METHOD_NAMES.get(info.compress_type, "unknown")
            raise self.bad(
                f"member {info.filename[:120]!r} uses compression method {info.compress_type} "
                f"({method_name}), which neither torch nor mergebuild reads"
            )
        if not flags & 0x8:  # sizes are in the local header (else in a trailing descriptor)
            for what, loc, cen in (
                ("CRC", crc, info.CRC),
                ("compressed size", csize, info.compress_size),
                ("size", usize, info.file_size),
            ):
                if loc != cen and loc != 0xFFFFFFFF:
                    raise self.bad(
                        f"member {info.filename[:120]!r} has {what} {loc} in its local header but "
                        f"{cen} in the central directory"
                    )
        return Member(
            info.filename,
            info.header_offset + _LOCAL.size + nlen + xlen,
            info.file_size,
            info.compress_type != zipfile.ZIP_STORED,
            info,
        )

    def record(self, name: str, cap: int) -> bytes | None:
        """A small member's bytes (decompressed, CRC-checked), or None if absent."""
        m = self.members.get(f"{self.prefix}/{name}")
        if m is None:
            return None
        if m.size > cap:
            raise self.bad(f"member {m.name[:120]!r} is {m.size} bytes (limit {cap})")
        return self._unpack(m)

    def _unpack(self, m: Member) -> bytes:
        try:
            with self.zf.open(m.info) as f:
                data = f.read(m.size + 1)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise self.changed(f"member {m.name[:120]!r}: {e}") from None
        except Exception as e:  # zlib/bz2/lzma errors on a damaged stream
            raise self.changed(f"member {m.name[:120]!r}: {type(e).__name__}: {e}") from None
        if len(data) != m.size:
            raise self.changed(
                f"member {m.name[:120]!r} holds {len(data)} bytes, declares {m.size}"
            )
        return data

    def changed(self, why: str) -> BuildError:
        return BuildError(f"{self.path}: changed or truncated while reading, or damaged ({why})")

    def fill(self, m: Member, offset: int, out: Any) -> None:
        """Bytes [offset, offset + len(out)) of member `m` into the writable buffer `out`."""
        view = memoryview(out).cast("B")
        if not view:
            return
        if m.compressed:
            with self._lock:
                if self._unpacked is None or self._unpacked[0] != m.name:
                    self._unpacked = None  # drop the previous member before unpacking the next
                    self._unpacked = (m.name, self._unpack(m))
                data = self._unpacked[1]
            view[:] = data[offset : offset + len(view)]
            return
        pos = m.data_offset + offset
        while view:
            try:
                got = os.preadv(self.fd, [view], pos)
            except OSError as e:
                raise BuildError(f"cannot read {self.path}: {e.strerror}") from None
            if got == 0:
                now = os.fstat(self.fd).st_size
                raise self.changed(
                    f"member {m.name[:120]!r} needs bytes up to {pos + len(view)}, "
                    f"the file now has {now}"
                )
            view, pos = view[got:], pos + got

    def close(self) -> None:
        self._unpacked = None
        zf = getattr(self, "zf", None)
        if zf is not None:
            zf.close()
        self.file.close()


def unpickle(archive: ZipArchive, globals_ok: list[Any]) -> tuple[Any, dict[int, Member]]:
    """data.pkl's object tree with tensors on meta storages, and storage id → its member.

    Raises whatever torch's weights-only unpickler raises for a refused pickle (the caller
    turns it into a message) and BuildError for a storage the archive cannot back."""
    import torch
    from torch._weights_only_unpickler import Unpickler

    data = archive.record("data.pkl", PICKLE_CAP)
    if data is None:
        raise archive.bad(f"no {archive.prefix[:120] + '/data.pkl'!r} member")
    loaded: dict[str, Any] = {}
    backing: dict[int, Member] = {}

    def persistent_load(pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5):
            raise archive.bad(f"unexpected persistent id {str(pid)[:80]}")
        _, stype, key, _location, numel = pid
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise archive.bad(f"malformed storage reference {str(pid)[:80]}")
        if key in loaded:
            return loaded[key]
        dtype = torch.uint8 if stype is torch.UntypedStorage else getattr(stype, "dtype", None)
        if not isinstance(dtype, torch.dtype):
            raise archive.bad(f"storage {key[:120]!r} has no known element type")
        nbytes = numel * torch._utils._element_size(dtype)
        m = archive.members.get(f"{archive.prefix}/data/{key}")
        if m is None:
            raise archive.bad(
                f"the pickle uses storage {key[:120]!r} but there is no member for it"
            )
        if m.size != nbytes:
            raise archive.bad(
                f"member {m.name[:120]!r} declares {m.size} bytes but its storage needs {nbytes} "
                "(truncated or crafted)"
            )
        if m.compressed and m.size > COMPRESSED_MEMBER_CAP:
            raise archive.bad(
                f"member {m.name[:120]!r} is compressed and {m.size} bytes unpacked (limit "
                f"{COMPRESSED_MEMBER_CAP}); re-save the checkpoint uncompressed (torch.save "
                "does) or convert it to .safetensors"
            )
        untyped = torch.UntypedStorage(nbytes, device="meta")
        backing[untyped._cdata] = m
        loaded[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        return loaded[key]

    unpickler = Unpickler(io.BytesIO(data), encoding="utf-8")
    unpickler.persistent_load = persistent_load  # type: ignore[method-assign]
    with torch.serialization.safe_globals(globals_ok):
        obj = unpickler.load()
    return obj, backing


def byteorder(archive: ZipArchive) -> str:
    """The byte order the storages were written in (torch assumes little when unrecorded)."""
    raw = archive.record("byteorder", 16)
    if raw is None:
        return "little"
    if raw not in (b"little", b"big"):
        raise archive.bad(f"unknown byte order {raw[:16]!r}")
    return raw.decode()


def needs_swap(order: str) -> bool:
    return order != sys.byteorder


def tensor_ref(
    archive: ZipArchive, key: str, t: torch.Tensor, backing: dict[int, Member]
) -> TensorRef:
    """Check one meta tensor's geometry against its member; refuse what the file cannot hold."""
    import torch

    where = f"{archive.path}: tensor '{key}'"
    if (
        t.layout != torch.strided
        or t.is_quantized
        or type(t) not in (torch.Tensor, torch.nn.Parameter)
    ):
        raise BuildError(f"{where} is not a plain dense tensor ({t.layout}, {type(t).__name__})")
    try:
        dtype = from_torch(t.dtype)
    except ValueError:
        raise BuildError(f"{where} has dtype {t.dtype}, which mergebuild cannot store") from None
    m = backing.get(t.untyped_storage()._cdata)
    if m is None:
        raise BuildError(f"{where} is not backed by a storage in the archive")
    shape, stride, offset = tuple(t.shape), tuple(t.stride()), t.storage_offset()
    size = ITEMSIZE[dtype]
    why = shape_problem(shape, size)
    if why:
        raise BuildError(f"{where} {why}")
    numel = math.prod(shape)
    need = numel * size
    have = m.size - offset * size
    # a view (e.g. stride 0) can claim far more elements than the file stores: a 2 KB file
    # would otherwise make us allocate and write gigabytes
    if need > have or offset < 0 or any(s < 0 for s in stride):
        raise BuildError(
            f"{where} claims {need} bytes but the file stores {max(have, 0)} for it "
            "(a crafted or damaged checkpoint)"
        )
    if numel:
        last = offset + sum((d - 1) * s for d, s in zip(shape, stride, strict=True))
        if (last + 1) * size > m.size:
            raise BuildError(f"{where} reaches past the end of its storage {m.name[:120]!r}")
    return TensorRef(TensorInfo(dtype, shape), m, offset, stride, _is_contiguous(shape, stride))


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expect = 1
    for d, s in zip(reversed(shape), reversed(stride), strict=True):
        if d != 1 and s != expect:
            return False
        expect *= d
    return True


def read_flat(archive: ZipArchive, ref: TensorRef, lo: int, hi: int, swap: bool) -> torch.Tensor:
    """Elements [lo, hi) of the flattened tensor, reading only the bytes they need (a
    contiguous tensor) or the rows of dimension 0 that hold them (any other view)."""
    import torch

    info = ref.info
    size = ITEMSIZE[info.dtype]
    dtype = to_torch(info.dtype)
    if ref.contiguous or math.prod(info.shape) <= 1:
        out = torch.empty(hi - lo, dtype=dtype)
        _fill(archive, ref.member, (ref.storage_offset + lo) * size, out, swap)
        return out
    shape, stride = info.shape, ref.stride
    inner = math.prod(shape[1:])
    r0, r1 = lo // inner, -(-hi // inner)
    first = ref.storage_offset + r0 * stride[0]
    last = ref.storage_offset + (r1 - 1) * stride[0]
    last += sum((d - 1) * s for d, s in zip(shape[1:], stride[1:], strict=True))
    span = torch.empty(last - first + 1, dtype=dtype)
    _fill(archive, ref.member, first * size, span, swap)
    rows = span.as_strided((r1 - r0, *shape[1:]), stride, 0)
    return rows.reshape(-1)[lo - r0 * inner : hi - r0 * inner].clone()


def _fill(archive: ZipArchive, m: Member, offset: int, out: torch.Tensor, swap: bool) -> None:
    import torch

    raw = out.view(torch.uint8).numpy()
    archive.fill(m, offset, raw)
    if swap and out.element_size() > 1:
        raw.view(f"u{out.element_size()}").byteswap(inplace=True)
