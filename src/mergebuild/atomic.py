"""Crash-safe file publication: write a temp file in the target's directory, fsync, rename.

A reader (or a later build) sees either the old file or the complete new one, never a prefix;
a killed process leaves at most a `.mergebuild-tmp-*` file, which `cache gc` sweeps.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import mmap

TMP_PREFIX = ".mergebuild-tmp-"
_UMASK = os.umask(0)
os.umask(_UMASK)


def pwrite_all(fd: int, data: bytes | memoryview, at: int) -> None:
    """Write all of `data` at offset `at` (os.pwrite may write less than it is given)."""
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n


GIL_FREE_COPY = 1 << 16  # bytes from which copy_into releases the GIL


def copy_into(buf: mmap.mmap, offset: int, piece: bytes | memoryview, length: int = -1) -> None:
    """buf[offset : offset + n] = piece[:n] (n: `length`, or all of `piece`); a large piece
    with the GIL released.

    Why: a slice assignment copies holding the GIL, so the other threads (merge workers, a
    download's event loop) wait for it (the SDXL LoRA bake held the GIL 1.6 s in the output
    writer's copies alone); ctypes.memmove lets go of it. The ctypes array over `buf` is an
    export while the copy runs: the mmap cannot be closed under it. `bytes` are passed as they
    are (ctypes hands over their own buffer), so a download's copies need no numpy."""
    n = len(piece) if length < 0 else min(length, len(piece))
    if n < GIL_FREE_COPY:
        buf[offset : offset + n] = piece[:n]
        return
    import ctypes  # here: every command imports this module, few copy this much

    dst = (ctypes.c_char * n).from_buffer(buf, offset)
    if isinstance(piece, bytes):
        ctypes.memmove(dst, piece, n)
        return
    import numpy as np

    src = np.frombuffer(piece, dtype=np.uint8, count=n)
    ctypes.memmove(dst, src.ctypes.data, n)


def make_temp(directory: Path, suffix: str = "") -> tuple[int, Path]:
    """A new temp file in `directory` with normal (umask) permissions, not mkstemp's 0600."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=directory)
    os.fchmod(fd, 0o666 & ~_UMASK)
    return fd, Path(tmp)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(target: Path, mode: str = "wb") -> Iterator[tuple[int, Path]]:
    """Yield (fd, temp path) of a file that becomes `target` only if the block succeeds."""
    fd, tmp_path = make_temp(target.parent, target.suffix)
    try:
        yield fd, tmp_path
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp_path, target)
        fsync_dir(target.parent)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes(target: Path, data: bytes) -> None:
    with atomic_file(target) as (fd, _):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]


def publish(source: Path, target: Path) -> str:
    """Make `target` have `source`'s bytes: hardlink if possible, else copy; atomic either way.

    Returns "link", "copy" or "unchanged" (target already is `source`'s inode). A symlink at
    `target` is replaced by the file, never written through.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if not target.is_symlink() and os.path.samefile(source, target):
            return "unchanged"
    tmp = Path(tempfile.mktemp(prefix=TMP_PREFIX, suffix=target.suffix, dir=target.parent))
    try:
        os.link(source, tmp)
        how = "link"
    except OSError:
        with (
            atomic_file(target) as (fd, _),
            open(source, "rb") as src,
            os.fdopen(os.dup(fd), "wb") as dst,
        ):
            shutil.copyfileobj(src, dst, 1 << 22)
        return "copy"
    try:
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return how
