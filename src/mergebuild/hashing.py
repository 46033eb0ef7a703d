"""Hashes of input files, memoized by (dev, inode, size, mtime_ns).

One read of a file yields everything anyone asks of it: the xxh3-128 content key (fast; what
cache keys are built from), the full SHA-256 (what model sites, lock files and provenance use;
its first 10 hex digits are the "AutoV2" short hash) and the web UI's legacy 8-hex hash
(SHA-256 of the 64 KiB at offset 1 MiB). Hashing a 7 GB checkpoint takes seconds; the memo lets
an unchanged file (same inode, size and mtime) reuse its hashes, while a `touch` forces a
re-hash that, with unchanged bytes, yields the same key — so nothing rebuilds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import xxhash

from mergebuild.atomic import write_bytes
from mergebuild.errors import BuildError
from mergebuild.textfile import JSON_CAP, read_capped

CHUNK = 1 << 22
LEGACY_OFFSET, LEGACY_SIZE = 0x100000, 0x10000
MEMO_FORMAT = 2


def stat_signature(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


@dataclass(frozen=True)
class FileHashes:
    xxh3: str
    sha256: str
    legacy: str  # web UI "model hash" (8 hex)
    size: int

    @property
    def autov2(self) -> str:
        return self.sha256[:10]


@dataclass(frozen=True)
class SplitChecksum:
    """A cache object's checksum: the xxh3-128 of its header and of its data section, apart.

    Apart because a build that hashes its inputs while merging (build/speculate.py) learns the
    header's provenance fields only after the data is written: it rewrites the header last,
    and the data's running hash stays valid. Older sidecars hold one whole-file xxh3.
    """

    head_bytes: int
    head: str
    body: str

    @classmethod
    def of(cls, head: bytes, body: str) -> SplitChecksum:
        return cls(len(head), xxhash.xxh3_128_hexdigest(head), body)

    @classmethod
    def parse(cls, value: object) -> SplitChecksum | None:
        """From a sidecar or memo field; None if it is not one."""
        try:
            assert isinstance(value, dict)
            found = cls(int(value["head_bytes"]), str(value["head"]), str(value["body"]))
        except (AssertionError, KeyError, TypeError, ValueError):
            return None
        return found if found.head_bytes >= 0 else None

    def as_json(self) -> dict[str, int | str]:
        return asdict(self)


def split_checksum_file(path: Path, head_bytes: int) -> SplitChecksum:
    """Read `path` back and compute its SplitChecksum (`cache verify`, or no memo)."""
    head, body = xxhash.xxh3_128(), xxhash.xxh3_128()
    buf = bytearray(CHUNK)
    at = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            chunk = memoryview(buf)[:n]
            cut = min(n, max(0, head_bytes - at))
            head.update(chunk[:cut])
            body.update(chunk[cut:])
            at += n
    if at < head_bytes:
        raise OSError(f"shorter ({at} bytes) than its header ({head_bytes} bytes)")
    return SplitChecksum(head_bytes, head.hexdigest(), body.hexdigest())


class StreamHasher:
    """The hashes of a file fed to it in order, chunk by chunk (`hash_file`, or a merge that
    reads the file: engine/hash_tap.py)."""

    def __init__(self, full: bool = True) -> None:
        self.full = full
        self.xx, self.sha = xxhash.xxh3_128(), hashlib.sha256()
        self.size = 0
        self.legacy = bytearray()

    def update(self, chunk: memoryview | bytes) -> None:
        n = len(chunk)
        self.xx.update(chunk)
        if self.full:
            self.sha.update(chunk)
            lo, hi = max(LEGACY_OFFSET - self.size, 0), LEGACY_OFFSET + LEGACY_SIZE - self.size
            if hi > 0 and lo < n:
                self.legacy += chunk[lo:hi]
        self.size += n

    def result(self) -> FileHashes:
        if not self.full:
            return FileHashes(self.xx.hexdigest(), "", "", self.size)
        legacy = hashlib.sha256(self.legacy).hexdigest()[:8]
        return FileHashes(self.xx.hexdigest(), self.sha.hexdigest(), legacy, self.size)


def hash_file(path: Path, full: bool = True) -> FileHashes:
    """All hashes in one sequential read (SHA-256 runs at ~1.6 GB/s here, about disk speed).

    `full=False` computes only the xxh3 key (15× faster): enough to check a cache object.
    A file mostly outside the page cache is read with O_DIRECT, DIRECT_DEPTH requests in
    flight (see _hash_direct); else, or where that fails, through the page cache.
    """
    with open(path, "rb", buffering=0) as f:
        hashed = _hash_direct(f.fileno(), full)
        if hashed is not None:
            return hashed
        hasher = StreamHasher(full)
        buf = bytearray(CHUNK)  # reused: a fresh 4 MB object per read page-faults at every step
        with contextlib.suppress(AttributeError, OSError):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger readahead
        while n := f.readinto(buf):
            hasher.update(memoryview(buf)[:n])
    return hasher.result()


# O_DIRECT reads in flight while hashing. Why direct: reading a cold 2.1 GB SD1 file through
# the page cache cost 4.5 s of system CPU on this VM (fresh page-cache pages) and ran at
# 0.2-0.7 GB/s, the hashing itself 1.4 s of CPU.
DIRECT_DEPTH = 4


def _hash_direct(fd: int, full: bool) -> FileHashes | None:
    """`fd`'s hashes read with O_DIRECT, or None: the file is mostly in the page cache
    already (reading it from there is cheaper), or O_DIRECT is unavailable or fails here (the
    caller then reads it through the page cache from the start)."""
    import mmap
    from concurrent.futures import Future, ThreadPoolExecutor

    from mergebuild.engine.readahead import open_direct, read_mode

    if read_mode(fd) != "direct":
        return None
    twin = open_direct(fd)
    if twin < 0:
        return None
    size = os.fstat(fd).st_size
    bufs = [mmap.mmap(-1, CHUNK) for _ in range(DIRECT_DEPTH)]  # page-aligned, as O_DIRECT needs
    hasher = StreamHasher(full)
    try:
        with ThreadPoolExecutor(DIRECT_DEPTH, thread_name_prefix="hash-read") as pool:

            def read(i: int) -> Future[int]:
                return pool.submit(os.preadv, twin, [bufs[i % DIRECT_DEPTH]], i * CHUNK)

            count = -(-size // CHUNK)
            pending = {i: read(i) for i in range(min(DIRECT_DEPTH, count))}
            for i in range(count):
                n = pending.pop(i).result()
                if n != min(CHUNK, size - i * CHUNK):  # short: the file changed under us
                    return None
                hasher.update(memoryview(bufs[i % DIRECT_DEPTH])[:n])
                if i + DIRECT_DEPTH < count:
                    pending[i + DIRECT_DEPTH] = read(i + DIRECT_DEPTH)
    except OSError:
        return None
    finally:
        os.close(twin)
        for b in bufs:
            with contextlib.suppress(BufferError):
                b.close()
    return hasher.result()


class HashMemo:
    """One small JSON file per absolute input path under `<cache>/hashes/`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _entry(self, path: Path) -> Path:
        return self.directory / f"{xxhash.xxh3_64_hexdigest(str(path).encode())}.json"

    def hashes(self, path: Path, full: bool = True) -> tuple[FileHashes, bool]:
        """(hashes, was_memoized). Raises BuildError if the file is missing or unreadable.

        With `full=False` a memo holding only the xxh3 key is enough (cache objects).
        """
        try:
            st = path.stat()
        except FileNotFoundError:
            raise BuildError(f"input model not found: {path}") from None
        except OSError as e:
            raise BuildError(f"cannot read input model {path}: {e.strerror}") from None
        if not path.is_file():
            raise BuildError(f"input model is not a file: {path}")
        sig = stat_signature(st)
        memo = self._recall(path, sig)
        try:
            if memo is not None:
                found = FileHashes(**memo["hashes"])
                if found.sha256 or not full:
                    return found, True
        except (KeyError, TypeError):
            pass
        try:
            found = hash_file(path, full)
        except OSError as e:
            raise BuildError(f"cannot read input model {path}: {e.strerror}") from None
        if stat_signature(path.stat()) != sig:
            raise BuildError(f"{path} changed while it was being hashed; run the build again")
        self.remember(path, found, sig)
        return found, False

    def memoized(self, path: Path, st: os.stat_result) -> bool:
        """Whether `path`'s full hashes are memoized for its current stat."""
        memo = self._recall(path, stat_signature(st))
        hashes = memo.get("hashes") if memo else None
        return isinstance(hashes, dict) and bool(hashes.get("sha256"))

    def probably_unchanged(self, path: Path, st: os.stat_result) -> bool:
        """A memo for `path` under another stat (touched, copied over…) whose size and legacy
        sample (64 KiB at 1 MiB) still match: most likely the same bytes. Reads 64 KiB."""
        try:
            memo = json.loads(read_capped(self._entry(path), JSON_CAP))
            old = FileHashes(**memo["hashes"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if memo.get("path") != str(path) or old.size != st.st_size or not old.legacy:
            return False
        try:
            with open(path, "rb") as f:
                f.seek(LEGACY_OFFSET)
                sample = f.read(LEGACY_SIZE)
        except OSError:
            return False
        return hashlib.sha256(sample).hexdigest()[:8] == old.legacy

    def _recall(self, path: Path, sig: list[int]) -> dict | None:
        """The memo record of `path` if it was made while the file had signature `sig`."""
        try:
            memo = json.loads(read_capped(self._entry(path), JSON_CAP))
        except (OSError, ValueError):
            return None
        ok = (
            isinstance(memo, dict)
            and memo.get("format") == MEMO_FORMAT
            and memo.get("path") == str(path)
            and memo.get("stat") == sig
        )
        return memo if ok else None

    def split_checksum(self, path: Path, head_bytes: int) -> SplitChecksum:
        """A cache object's SplitChecksum, read back only if not memoized for its stat."""
        sig = stat_signature(path.stat())
        memo = self._recall(path, sig)
        found = SplitChecksum.parse(memo.get("split")) if memo else None
        if found is not None and found.head_bytes == head_bytes:
            return found
        found = split_checksum_file(path, head_bytes)
        if stat_signature(path.stat()) == sig:
            self.remember_split(path, found, sig)
        return found

    def remember_split(self, path: Path, found: SplitChecksum, sig: list[int]) -> None:
        self._write(path, sig, {"split": found.as_json()})

    def content_key(self, path: Path) -> tuple[str, bool]:
        found, memo = self.hashes(path, full=False)
        return found.xxh3, memo

    def remember(self, path: Path, found: FileHashes, sig: list[int]) -> None:
        """Record `found` as the hashes of `path` while its stat signature is `sig`."""
        self._write(path, sig, {"hashes": asdict(found)})

    def _write(self, path: Path, sig: list[int], fields: dict) -> None:
        # the memo is an optimisation: a read-only cache dir must not fail the build
        with contextlib.suppress(OSError):
            record = {"format": MEMO_FORMAT, "path": str(path), "stat": sig, **fields}
            write_bytes(self._entry(path), json.dumps(record).encode())

    def forget(self, path: Path) -> None:
        self._entry(path).unlink(missing_ok=True)
