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


def hash_file(path: Path, full: bool = True) -> FileHashes:
    """All hashes in one sequential read (SHA-256 runs at ~2 GB/s here, about disk speed).

    `full=False` computes only the xxh3 key (15× faster): enough to check a cache object.
    """
    xx, sha = xxhash.xxh3_128(), hashlib.sha256()
    size = 0
    legacy = bytearray()
    buf = bytearray(CHUNK)  # reused: a fresh 4 MB object per read page-faults at every step
    with open(path, "rb", buffering=0) as f:
        with contextlib.suppress(AttributeError, OSError):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger readahead
        while n := f.readinto(buf):
            chunk = memoryview(buf)[:n]
            xx.update(chunk)
            if full:
                sha.update(chunk)
                lo, hi = max(LEGACY_OFFSET - size, 0), LEGACY_OFFSET + LEGACY_SIZE - size
                if hi > 0 and lo < n:
                    legacy += chunk[lo:hi]
            size += n
    if not full:
        return FileHashes(xx.hexdigest(), "", "", size)
    return FileHashes(xx.hexdigest(), sha.hexdigest(), hashlib.sha256(legacy).hexdigest()[:8], size)


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
        try:
            memo = json.loads(read_capped(self._entry(path), JSON_CAP))
            if (
                memo.get("format") == MEMO_FORMAT
                and memo.get("path") == str(path)
                and memo.get("stat") == sig
            ):
                found = FileHashes(**memo["hashes"])
                if found.sha256 or not full:
                    return found, True
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        try:
            found = hash_file(path, full)
        except OSError as e:
            raise BuildError(f"cannot read input model {path}: {e.strerror}") from None
        if stat_signature(path.stat()) != sig:
            raise BuildError(f"{path} changed while it was being hashed; run the build again")
        self.remember(path, found, sig)
        return found, False

    def content_key(self, path: Path) -> tuple[str, bool]:
        found, memo = self.hashes(path, full=False)
        return found.xxh3, memo

    def remember(self, path: Path, found: FileHashes, sig: list[int]) -> None:
        """Record `found` as the hashes of `path` while its stat signature is `sig`."""
        # the memo is an optimisation: a read-only cache dir must not fail the build
        with contextlib.suppress(OSError):
            record = {"format": MEMO_FORMAT, "path": str(path), "stat": sig}
            write_bytes(self._entry(path), json.dumps({**record, "hashes": asdict(found)}).encode())

    def forget(self, path: Path) -> None:
        self._entry(path).unlink(missing_ok=True)
