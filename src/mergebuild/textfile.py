"""Bounded reads of the small text files mergebuild trusts nothing about.

Recipes, includes, lock files, sidecars, journals and hash memos may come from a download or a
hostile link: `/dev/zero` would be read until memory runs out, a FIFO would block forever. Every
such file must be a regular file (checked on the opened descriptor, so a swap after the check
changes nothing) and is read with a cap: at most `cap + 1` bytes, so "too large" is known
without reading the rest.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

RECIPE_CAP = 4 << 20  # a recipe or include: hand-written YAML, never megabytes
LOCK_CAP = 16 << 20  # a lock file: one entry per input, output and node
JSON_CAP = 16 << 20  # cache sidecars, journals, hash memos


class TextFileError(OSError):
    """The file is not a regular file, or larger than its cap; `str()` says which (no path)."""


def read_capped(path: Path | str, cap: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `cap` bytes.

    Raises FileNotFoundError (and other OSErrors) as `open` does, and TextFileError for a
    device, FIFO, socket or directory, or a file larger than `cap`. Opening never blocks: a
    FIFO is opened non-blocking and refused before anything is read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TextFileError(f"the {what} is not a regular file")
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        total = 0
        while total <= cap:
            chunk = os.read(fd, min(1 << 20, cap + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > cap:
            raise TextFileError(f"the {what} is larger than {_human(cap)}")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_capped_text(path: Path | str, cap: int, what: str = "file") -> str:
    """`read_capped` decoded as UTF-8 (UnicodeDecodeError, a ValueError, on bad bytes)."""
    return read_capped(path, cap, what).decode("utf-8")


def _human(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n} bytes"
