"""Content keys of input files: xxh3-128 of the bytes, memoized by (dev, inode, size, mtime_ns).

Hashing a 7 GB checkpoint takes seconds; re-hashing it on every build would make a cached build
slow. The memo lets an unchanged file (same inode, size and mtime) reuse its key, while a
`touch` forces a re-hash that, with unchanged bytes, yields the same key — so nothing rebuilds.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import xxhash

from mergebuild.atomic import write_bytes
from mergebuild.errors import BuildError

CHUNK = 1 << 22


def stat_signature(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def hash_file(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class HashMemo:
    """One small JSON file per absolute input path under `<cache>/hashes/`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _entry(self, path: Path) -> Path:
        return self.directory / f"{xxhash.xxh3_64_hexdigest(str(path).encode())}.json"

    def content_key(self, path: Path) -> tuple[str, bool]:
        """(key, was_memoized). Raises BuildError if the file is missing or unreadable."""
        try:
            st = path.stat()
        except FileNotFoundError:
            raise BuildError(f"input model not found: {path}") from None
        except OSError as e:
            raise BuildError(f"cannot read input model {path}: {e.strerror}") from None
        if not path.is_file():
            raise BuildError(f"input model is not a file: {path}")
        sig = stat_signature(st)
        entry = self._entry(path)
        try:
            memo = json.loads(entry.read_text())
            if memo.get("path") == str(path) and memo.get("stat") == sig:
                return memo["xxh3"], True
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        try:
            key = hash_file(path)
        except OSError as e:
            raise BuildError(f"cannot read input model {path}: {e.strerror}") from None
        if stat_signature(path.stat()) == sig:  # unchanged while we read it
            # the memo is an optimisation: a read-only cache dir must not fail the build
            self.remember(path, key, sig)
        return key, False

    def remember(self, path: Path, key: str, sig: list[int]) -> None:
        """Record `key` as the content of `path` while its stat signature is `sig`."""
        with contextlib.suppress(OSError):
            write_bytes(
                self._entry(path),
                json.dumps({"path": str(path), "stat": sig, "xxh3": key}).encode(),
            )

    def forget(self, path: Path) -> None:
        self._entry(path).unlink(missing_ok=True)
