"""Which directory is a mergebuild cache, and which names in it are ours to delete.

A wrong `--cache-dir` (or `MERGEBUILD_CACHE_DIR=~`) must never let `cache clean` or `gc`
delete a home folder, and a symlink planted inside a cache must never lead a deletion
elsewhere. So a cache root carries a CACHEDIR.TAG (the Cache Directory Tagging spec, which
backup tools honour too), written when mergebuild first writes there; deleting code opens every
directory with O_NOFOLLOW, unlinks relative to that descriptor (a swap after the check changes
nothing), and removes only regular files whose names have the exact shape of the cache's own.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from mergebuild.atomic import TMP_PREFIX, write_bytes
from mergebuild.errors import BuildError

MARKER = "CACHEDIR.TAG"
SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"  # the spec's required first 43 bytes
FORMAT = 1
MARKER_BYTES = SIGNATURE + (
    b"\n# This file is a cache directory tag created by mergebuild.\n"
    b"# mergebuild-cache-format: %d\n"
    b"# For information about cache directory tags, see https://bford.info/cachedir/\n" % FORMAT
)
SUBDIRS = ("objects", "hashes", "journal", "locks")

SHARD = re.compile(r"[0-9a-f]{2}\Z")
KEY = re.compile(r"[0-9a-f]{32}\Z")  # node and output keys: xxh3-128 hex
OBJECT = re.compile(r"([0-9a-f]{32})\.(safetensors|json)\Z")
TEMP = re.compile(re.escape(TMP_PREFIX) + r"[A-Za-z0-9_]{1,64}(\.[A-Za-z0-9_]{1,32})?\Z")
FLAT = {  # the files of the other subdirectories (names from hashing.py and cache.py)
    "hashes": re.compile(r"[0-9a-f]{16}\.json\Z"),
    "journal": re.compile(r"[0-9a-f]{16}\.json\Z"),
    "locks": re.compile(r"[0-9a-f]{32}\.lock\Z"),
}

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class NotACacheError(BuildError):
    """The directory is not one mergebuild may delete in; `str()` says why and what to do."""


def object_key(shard: str, name: str) -> str | None:
    """The key of `objects/<shard>/<name>` if the name is an entry's, in its own shard."""
    m = OBJECT.match(name)
    return m.group(1) if m and m.group(1)[:2] == shard else None


def open_dir(name: str | Path, dir_fd: int | None = None, follow: bool = False) -> int:
    """A directory descriptor; without `follow`, a symlink fails (ELOOP/ENOTDIR)."""
    return os.open(name, _DIR | (0 if follow else os.O_NOFOLLOW), dir_fd=dir_fd)


def open_subdir(parent_fd: int, name: str) -> int | None:
    """`name` under `parent_fd` if it is a real directory; None if absent, a symlink or else."""
    try:
        return open_dir(name, parent_fd)
    except OSError:
        return None


def unlink_file(dir_fd: int, name: str) -> bool:
    """Unlink `name` only if it is a regular file (never a symlink, directory or device)."""
    try:
        if not stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            return False
        os.unlink(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False


def has_marker(root_fd: int) -> bool:
    """The spec's tag: a regular file (not a symlink) starting with the signature."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(MARKER, flags, dir_fd=root_fd)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        return os.read(fd, len(SIGNATURE)) == SIGNATURE
    finally:
        os.close(fd)


def foreign_entries(root_fd: int) -> list[str]:
    """Entries that an (unmarked) cache made by mergebuild would not hold.

    Empty means the directory is empty or looks exactly like a cache of an older mergebuild:
    top level only objects/ hashes/ journal/ locks/ (real directories), temp files and the
    marker; objects/ only two-hex-digit shard directories.
    """
    odd: list[str] = []
    with os.scandir(root_fd) as it:
        for e in it:
            if e.name in SUBDIRS and e.is_dir(follow_symlinks=False):
                continue
            if (e.name == MARKER or TEMP.match(e.name)) and e.is_file(follow_symlinks=False):
                continue
            odd.append(e.name)
    objects = open_subdir(root_fd, "objects")
    if objects is not None:
        try:
            with os.scandir(objects) as it:
                odd += [
                    f"objects/{e.name}"
                    for e in it
                    if not (SHARD.match(e.name) and e.is_dir(follow_symlinks=False))
                ]
        finally:
            os.close(objects)
    return sorted(odd)


def _listing(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def ensure_marker(root: Path) -> None:
    """Before the first write into `root`: create it with its marker, or adopt it.

    An existing root without the marker is adopted only if `foreign_entries` finds nothing
    (empty, or a cache from before markers existed); anything else is someone's folder, and
    mergebuild refuses to use it as a cache. A symlinked root is followed: the user chose it.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = open_dir(root, follow=True)
    except OSError as e:
        raise NotACacheError(f"cannot use {root} as the cache directory: {e.strerror}") from None
    try:
        if has_marker(fd):
            return
        odd = foreign_entries(fd)
        if odd:
            raise NotACacheError(
                f"{root} is not a mergebuild cache (no {MARKER}) and holds other things "
                f"({_listing(odd)}); choose a new or empty directory with --cache-dir or "
                "MERGEBUILD_CACHE_DIR"
            )
        write_bytes(root / MARKER, MARKER_BYTES)
    finally:
        os.close(fd)


def open_for_delete(root: Path, follow_root: bool = False) -> int | None:
    """The root's descriptor if deleting in it is allowed; None if there is nothing there.

    Raises NotACacheError for a symlinked root (unless `follow_root`), a non-directory, or a
    directory without the marker.
    """
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise NotACacheError(f"cannot read the cache directory {root}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode) and not follow_root:
        raise NotACacheError(
            f"{root} is a symlink (to {os.readlink(root)}); cache commands never delete through "
            f"a symlink: pass --cache-dir {root.resolve()} to work on the directory itself"
        )
    try:
        fd = open_dir(root, follow=follow_root)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise NotACacheError(f"{root} is not a cache directory: {e.strerror}") from None
    if has_marker(fd):
        return fd
    try:
        odd = foreign_entries(fd)
    finally:
        os.close(fd)
    if odd:
        raise NotACacheError(
            f"{root} is not a mergebuild cache (no {MARKER}; it holds {_listing(odd)}); "
            "nothing was deleted"
        )
    raise NotACacheError(
        f"{root} has no {MARKER}, so mergebuild deletes nothing in it; if it is a cache made "
        f"by an older mergebuild, mark it with `mergebuild cache adopt --cache-dir {root}` "
        "(a build using it marks it too)"
    )
