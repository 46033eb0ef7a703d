"""Download one pinned model into the store: streamed, resumable, verified, then renamed.

Memory stays bounded (one 4 MiB chunk at a time). The bytes go to the model's fixed partial
file (store.partial_name), locked with flock so a second process waits instead of writing
into it too; a partial left by an earlier run is continued where it stopped (its bytes are
hashed again from disk, then the source is asked for the rest with a Range request or a
seek). Every hash mergebuild needs (SHA-256, xxh3 key, legacy) is computed from the stream, so
the build that follows reads the file once, to merge it. The SHA-256 is compared with the pin
before the file is fsynced and renamed to `<hex><suffix>`: a mismatch empties the partial and
names both hashes and the source; a source that fails is followed by the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergebuild.atomic import fsync_dir
from mergebuild.errors import BuildError
from mergebuild.fetch.sources import source_suffix
from mergebuild.fetch.store import SUBDIR, partial_name, stored_model
from mergebuild.fetch.transport import FetchError, RangeRefused, open_source
from mergebuild.hashing import CHUNK, StreamHasher, stat_signature
from mergebuild.locate import MAX_MODEL_SIZE

if TYPE_CHECKING:
    from mergebuild.cache import CacheStore
    from mergebuild.progress import Progress
    from mergebuild.recipe.model import ModelInput


class _Mismatch(FetchError):
    """The source served other bytes than the pin: the partial was emptied."""


def sources_of(model: ModelInput) -> list[str]:
    """The sources to try, in order: the URLs as listed, then the hub."""
    return [*model.urls, *([f"hf:{model.hf}"] if model.hf else [])]


def download(model: ModelInput, store: CacheStore, progress: Progress) -> Path:
    """The stored file of `model` (downloaded now unless it already is); BuildError naming
    every source and why it failed."""
    sha = model.sha256 or ""
    store.ensure_marker()  # a cache root that is someone's folder is refused before any write
    directory = store.real_dir(*SUBDIR)
    fd = _lock_partial(directory / partial_name(sha))
    try:
        done = stored_model(store.root, sha)  # another process may have finished meanwhile
        if done is not None:
            _drop_if_empty(fd, directory / partial_name(sha))
            return done
        final = directory / f"{sha}{source_suffix(model.urls, model.hf)}"
        failures: list[str] = []
        for source in sources_of(model):
            try:
                hashes = _fetch(source, fd, sha, model.name, progress)
            except FetchError as e:
                failures.append(f"{source}: {e}")
                progress.log(f"download of {model.name} failed: {failures[-1]}")
                continue
            os.fsync(fd)
            os.replace(directory / partial_name(sha), final)  # our locked inode: see _lock_partial
            fsync_dir(directory)
            store.hashes.remember(final, hashes, stat_signature(final.stat()))
            return final
        kept = _drop_if_empty(fd, directory / partial_name(sha))
        raise BuildError(
            f"model '{model.name}' (sha256 {sha}) could not be downloaded:\n    "
            + "\n    ".join(failures)
            + (f"\n  the partial download is kept and will be resumed: {kept}" if kept else "")
        )
    finally:
        os.close(fd)


def _lock_partial(path: Path) -> int:
    """The partial file, opened and exclusively locked; retried if another process renamed
    or removed it while we waited (the lock then belongs to a file that is gone)."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            raise BuildError(f"cannot write the download {path}: {e.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BuildError(f"{path} is not a regular file; move it away")
            fcntl.flock(fd, fcntl.LOCK_EX)
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)


def _drop_if_empty(fd: int, path: Path) -> Path | None:
    """Remove an empty partial (nothing to resume); return the path of one that is kept."""
    if os.fstat(fd).st_size:
        return path
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return None


def _rehash(fd: int) -> StreamHasher:
    """The hashes of the partial's bytes so far, read back from disk (a resumed download)."""
    hasher = StreamHasher()
    buf = bytearray(CHUNK)
    at, size = 0, os.fstat(fd).st_size
    while at < size:
        n = os.preadv(fd, [buf], at)
        if n == 0:
            break
        hasher.update(memoryview(buf)[:n])
        at += n
    return hasher


def _fetch(source: str, fd: int, sha: str, name: str, progress: Progress) -> Any:
    """Complete the partial from `source`; its FileHashes, or FetchError (partial kept, or
    emptied on a mismatch)."""
    hasher = _rehash(fd)
    if hasher.size:  # a run killed between the last byte and the rename: nothing to fetch
        found = hasher.result()
        if found.sha256 == sha:
            return found  # (hexdigest does not end a hash: the prefix's state goes on below)
    try:
        opened = open_source(source, hasher.size)
    except RangeRefused:  # the partial is as long as the file (or longer): start afresh
        os.ftruncate(fd, 0)
        hasher = StreamHasher()
        opened = open_source(source, 0)
    if opened.start != hasher.size:  # the source cannot resume: it sends the whole file
        os.ftruncate(fd, 0)
        hasher = StreamHasher()
    if opened.total is not None and opened.total > MAX_MODEL_SIZE:
        opened.stream.close()
        raise FetchError(f"announces {opened.total:,} bytes, more than any model")
    resumed = hasher.size
    with _Bar(progress, name, source, opened.total, resumed) as bar:
        try:
            _copy(opened, fd, hasher, bar)
        finally:
            with contextlib.suppress(Exception):
                opened.stream.close()
    if opened.total is not None and hasher.size != opened.total:
        raise FetchError(_cut(hasher.size, opened.total, "closed"))
    found = hasher.result()
    if found.sha256 != sha:
        os.ftruncate(fd, 0)
        raise _Mismatch(
            f"served a file with sha256 {found.sha256} ({found.size:,} bytes), but the recipe "
            f"pins {sha}: deleted it"
        )
    return found


def _cut(got: int, total: int | None, why: str) -> str:
    of = f" of {total:,}" if total is not None else ""
    return f"the transfer stopped after {got:,}{of} bytes ({why}); the next run resumes it"


def _copy(opened: Any, fd: int, hasher: StreamHasher, bar: _Bar) -> None:
    """Stream the source to the partial's end, chunk by chunk (bounded memory)."""
    os.lseek(fd, hasher.size, os.SEEK_SET)
    # read1: what has arrived (up to CHUNK), so a stall loses nothing already received
    read = getattr(opened.stream, "read1", opened.stream.read)
    while True:
        try:
            chunk = read(CHUNK)
        except Exception as e:  # a reset, a timeout, http.client.IncompleteRead, a backend's own
            raise FetchError(_cut(hasher.size, opened.total, f"{type(e).__name__}")) from None
        if not chunk:
            return
        if hasher.size + len(chunk) > MAX_MODEL_SIZE:
            raise FetchError(f"sends more than {MAX_MODEL_SIZE:,} bytes, more than any model")
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError as e:  # local: a full disk is not the source's fault, stop here
            raise BuildError(
                f"cannot write the download: {e.strerror}; the partial file is kept and the "
                "next run resumes it"
            ) from None
        hasher.update(chunk)
        bar.advance(len(chunk))


class _Bar:
    """A rich bar on a terminal, a line at start and end otherwise, nothing with -q."""

    def __init__(
        self, progress: Progress, name: str, source: str, total: int | None, done: int
    ) -> None:
        self.progress, self.name, self.source = progress, name, source
        self.total, self.done = total, done
        self.rich: Any = None
        self.t0 = time.perf_counter()

    def __enter__(self) -> _Bar:
        p = self.progress
        if p.interactive:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            from rich.progress import Progress as RichProgress

            self.rich = RichProgress(
                TextColumn(f"[bold]download {self.name}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(file=p.stream),
            )
            self.rich.start()
            self.task = self.rich.add_task("", total=self.total, completed=self.done)
        else:
            at = f" from byte {self.done:,}" if self.done else ""
            p.log(f"downloading {self.name} from {self.source}{at}")
        return self

    def advance(self, n: int) -> None:
        self.done += n
        if self.rich is not None:
            self.rich.update(self.task, advance=n)

    def __exit__(self, *exc: object) -> None:
        if self.rich is not None:
            self.rich.stop()
        elif exc[0] is None:
            dt = time.perf_counter() - self.t0
            self.progress.log(f"downloaded {self.name}: {self.done / 1e6:,.1f} MB in {dt:.1f} s")
