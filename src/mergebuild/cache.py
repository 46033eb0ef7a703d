"""The content-addressed store: one safetensors file per key, plus what a build remembers.

Layout under the cache root:
  CACHEDIR.TAG                   marks the root as a cache (see cacheroot.py): no deletion without
  objects/ab/<key>.safetensors   a node's or output's bytes (outputs are hardlinks to these)
  objects/ab/<key>.json          sidecar: what it is, size, checksum, which recipe built it
  hashes/                        memo of input content keys (see hashing.py)
  journal/<recipe>.json          last build of each recipe: keys and params, for "why" and gc
  locks/<key>.lock               one builder per key across processes

Every deletion goes through cacheroot's rules: a marked root, no symlink followed below it,
only regular files named like the cache's own; anything else is reported and left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from mergebuild.atomic import write_bytes
from mergebuild.cacheroot import (
    FLAT,
    KEY,
    MARKER,
    SHARD,
    SUBDIRS,
    TEMP,
    NotACacheError,
    ensure_marker,
    object_key,
    open_dir,
    open_for_delete,
    open_subdir,
    unlink_file,
)
from mergebuild.errors import BuildError
from mergebuild.fetch.store import clean_store
from mergebuild.hashing import (
    HashMemo,
    SplitChecksum,
    hash_file,
    split_checksum_file,
    stat_signature,
)
from mergebuild.textfile import JSON_CAP, read_capped

if TYPE_CHECKING:
    from filelock import FileLock

ENV_VAR = "MERGEBUILD_CACHE_DIR"
STALE_TMP_SECONDS = 86400
CHECKSUM = "xxh3_128"  # sidecar field: xxh3-128 of the object's bytes, taken at write time
SPLIT = "xxh3_128_split"  # sidecar field: the same for header and data apart (SplitChecksum)


def default_root() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("mergebuild"))


@dataclass(frozen=True)
class Entry:
    key: str
    path: Path
    size: int
    info: dict[str, Any]


@dataclass
class Report:
    """What a maintenance command found and did."""

    missing: bool = False  # no directory at the root: nothing to do
    removed: list[Entry] = field(default_factory=list)
    bad: list[tuple[Entry, str]] = field(default_factory=list)
    leftovers: list[Path] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # not named like ours: left alone
    files: int = 0  # files deleted


@dataclass
class _Shard:
    """One objects/ shard: its descriptor and regular files by key ({suffix: stat})."""

    name: str
    fd: int
    keys: dict[str, dict[str, os.stat_result]]
    temps: list[tuple[str, os.stat_result]]


class _StoreMemo(HashMemo):
    """The input hash memo, written only into a marked cache and forgotten without symlinks."""

    def __init__(self, store: CacheStore) -> None:
        super().__init__(store.root / "hashes")
        self._store = store

    def _write(self, path: Path, sig: list[int], fields: dict) -> None:
        try:
            self._store.ensure_marker()
            self._store.real_dir("hashes")
        except BuildError:
            return  # the memo is an optimisation: no cache, no memo
        super()._write(path, sig, fields)

    def forget(self, path: Path) -> None:
        self._store._forget_memo(self._entry(path).name)


class CacheStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_root()).expanduser().absolute()
        self.objects = self.root / "objects"
        self.journal_dir = self.root / "journal"
        self.hashes: HashMemo = _StoreMemo(self)
        self._marked = False

    def ensure_marker(self) -> None:
        """Called before every write: the root is created marked, or adopted (cacheroot)."""
        if not self._marked:
            ensure_marker(self.root)
            for d in ("objects", "journal", "locks"):  # fail before any work, not at the end
                self.real_dir(d)
            self._marked = True

    def object_path(self, key: str) -> Path:
        return self.objects / key[:2] / f"{key}.safetensors"

    def real_dir(self, *parts: str) -> Path:
        """`root/parts…` created as real directories, for writing into: a symlink planted
        below the root (objects/ab → elsewhere) would send cache writes outside the cache."""
        path = self.root
        for part in parts:
            path = path / part
            with contextlib.suppress(FileExistsError):
                path.mkdir()
            st = path.lstat()
            if not stat.S_ISDIR(st.st_mode):
                kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
                raise BuildError(
                    f"{path} is {kind}: mergebuild writes only into real directories under the "
                    f"cache root {self.root}; move it away"
                )
        return path

    def object_dir(self, key: str) -> Path:
        """The shard directory an object is written into (checked by `real_dir`)."""
        self.ensure_marker()
        return self.real_dir("objects", key[:2])

    def has(self, key: str) -> bool:
        """An object counts only with its sidecar: a build killed between the two left it."""
        path = self.object_path(key)
        return path.is_file() and path.with_suffix(".json").is_file()

    def write_sidecar(
        self, key: str, info: dict[str, Any], checksum: SplitChecksum | None = None
    ) -> None:
        """Record the object's size and checksum: the one computed while writing, else read
        back right after it was written."""
        self.object_dir(key)
        path = self.object_path(key)
        sig = stat_signature(path.stat())
        info = {**info, "key": key, "size": sig[2]}
        if checksum is not None:
            info[SPLIT] = checksum.as_json()
        else:
            found = hash_file(path, full=False)
            info[CHECKSUM] = found.xxh3
        write_bytes(
            path.with_suffix(".json"),
            json.dumps({**info, "created": time.time()}, indent=1).encode(),
        )
        if stat_signature(path.stat()) == sig:  # a cached build need not re-read it
            if checksum is not None:
                self.hashes.remember_split(path, checksum, sig)
            else:
                self.hashes.remember(path, found, sig)

    def problem(self, key: str, memo: bool = True) -> str | None:
        """Why the entry `key` must not be used (None: its bytes match its checksum).

        With `memo`, an object whose stat signature is unchanged since it was last hashed is
        not re-read, so a fully cached build stays fast; `cache verify` reads everything.
        """
        path = self.object_path(key)
        try:
            info = json.loads(read_capped(path.with_suffix(".json"), JSON_CAP))
        except FileNotFoundError:
            return "no sidecar (interrupted write)"
        except (OSError, ValueError):
            return "sidecar unreadable"
        split = SplitChecksum.parse(info.get(SPLIT)) if isinstance(info, dict) else None
        if not isinstance(info, dict) or not (CHECKSUM in info or split) or "size" not in info:
            return "no checksum in its sidecar (written by an older mergebuild?)"
        want, size = (split, info["size"]) if split else (info[CHECKSUM], info["size"])
        try:
            st = path.stat()
        except FileNotFoundError:
            return "object file missing"
        if st.st_size != size:
            return f"size is {st.st_size} bytes, expected {size} (truncated?)"
        try:
            got: object
            if split is not None:
                hb = split.head_bytes
                got = (
                    self.hashes.split_checksum(path, hb) if memo else split_checksum_file(path, hb)
                )
            else:
                got = self.hashes.content_key(path)[0] if memo else hash_file(path, full=False).xxh3
        except (BuildError, OSError) as e:
            return f"unreadable ({e})"
        return None if got == want else "checksum mismatch (bytes changed on disk)"

    def remove(self, key: str) -> bool:
        """Delete a corrupted entry during a build (False: not deleted, the rebuild replaces it).

        The user's root may be a symlink (followed); nothing below it is, and the root must
        carry the marker.
        """
        if not KEY.match(key):
            return False
        try:
            root = open_for_delete(self.root, follow_root=True)
        except NotACacheError:
            return False
        if root is None:
            return False
        try:
            with _subdir(root, "objects") as objects:
                if objects is None:
                    return False
                with _subdir(objects, key[:2]) as shard:
                    if shard is None:
                        return False
                    done = self._remove_entry(shard, key)
            self._forget_memo(self.hashes._entry(self.object_path(key)).name, root)
            return done
        finally:
            os.close(root)

    def _remove_entry(self, shard_fd: int, key: str) -> bool:
        """Object first, so a half-removed entry is already 'not present'."""
        done = unlink_file(shard_fd, f"{key}.safetensors")
        return unlink_file(shard_fd, f"{key}.json") or done

    def _forget_memo(self, name: str, root_fd: int | None = None) -> None:
        if not FLAT["hashes"].match(name):
            return
        own = root_fd is None
        if own:
            try:
                root_fd = open_for_delete(self.root, follow_root=True)
            except NotACacheError:
                return
            if root_fd is None:
                return
        try:
            with _subdir(root_fd, "hashes") as hashes:
                if hashes is not None:
                    unlink_file(hashes, name)
        finally:
            if own:
                os.close(root_fd)

    def lock(self, key: str) -> FileLock:
        self.ensure_marker()
        from filelock import FileLock  # imported here: a no-op build takes no lock

        return FileLock(self.real_dir("locks") / f"{key}.lock")

    # -- journal -------------------------------------------------------------------------

    def _journal_path(self, recipe: Path) -> Path:
        return self.journal_dir / f"{xxhash.xxh3_64_hexdigest(str(recipe).encode())}.json"

    def read_journal(self, recipe: Path) -> dict[str, Any]:
        try:
            data = json.loads(read_capped(self._journal_path(recipe), JSON_CAP))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def write_journal(self, recipe: Path, data: dict[str, Any]) -> None:
        self.ensure_marker()
        self.real_dir("journal")
        write_bytes(
            self._journal_path(recipe),
            json.dumps({"recipe": str(recipe), **data}, indent=1).encode(),
        )

    # -- maintenance -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _read_root(self) -> Iterator[int | None]:
        """The root for read-only commands: a symlinked root is followed, nothing below it."""
        try:
            fd = open_dir(self.root, follow=True)
        except FileNotFoundError:
            fd = None
        except OSError as e:
            raise NotACacheError(f"{self.root} is not a cache directory: {e.strerror}") from None
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    @contextlib.contextmanager
    def _delete_root(self, report: Report) -> Iterator[int | None]:
        fd = open_for_delete(self.root)
        report.missing = fd is None
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    def _shards(self, root_fd: int, unknown: list[str]) -> Iterator[_Shard]:
        """Each real shard directory under objects/, its regular files named like ours;
        anything else goes to `unknown` (never followed, never deleted)."""
        with _subdir(root_fd, "objects", unknown) as objects:
            if objects is None:
                return
            with os.scandir(objects) as it:
                names = sorted(e.name for e in it)
            for name in names:
                if not SHARD.match(name):
                    unknown.append(f"objects/{name}")
                    continue
                with _subdir(objects, name, unknown, "objects/") as fd:
                    if fd is None:
                        continue
                    shard = _Shard(name, fd, {}, [])
                    with os.scandir(fd) as it:
                        files = sorted(it, key=lambda e: e.name)
                    for e in files:
                        key = object_key(name, e.name)
                        regular = e.is_file(follow_symlinks=False)
                        if key and regular:
                            shard.keys.setdefault(key, {})[e.name[33:]] = e.stat(
                                follow_symlinks=False
                            )
                        elif TEMP.match(e.name) and regular:
                            shard.temps.append((e.name, e.stat(follow_symlinks=False)))
                        else:
                            unknown.append(f"objects/{name}/{e.name}")
                    yield shard

    def _entry(self, key: str, st: os.stat_result) -> Entry:
        path = self.object_path(key)
        return Entry(key, path, st.st_size, _sidecar(path))

    def entries(self) -> Iterator[Entry]:
        with self._read_root() as root:
            if root is None:
                return
            for shard in self._shards(root, []):
                for key, files in shard.keys.items():
                    if "safetensors" in files:
                        yield self._entry(key, files["safetensors"])

    def live_keys(self, root_fd: int, dry_run: bool, report: Report) -> set[str]:
        """Keys used by the latest build of every recipe that still exists (the journals of
        vanished recipes are deleted, unless `dry_run`)."""
        keep: set[str] = set()
        for name, data in self._journals(root_fd, report):
            recipe = data.get("recipe")
            if not isinstance(recipe, str) or not Path(recipe).is_file():
                if not dry_run:
                    with _subdir(root_fd, "journal") as journal:
                        if journal is not None and unlink_file(journal, name):
                            report.files += 1
                continue
            for section in ("nodes", "outputs"):
                items = data.get(section)
                for v in items.values() if isinstance(items, dict) else ():
                    if isinstance(v, dict) and isinstance(v.get("key"), str):
                        keep.add(v["key"])
        return keep

    def _journals(self, root_fd: int, report: Report) -> list[tuple[str, dict[str, Any]]]:
        """(name, content) of every readable journal. A journal/ that is not a real directory
        stops gc: without journals every object would look unused."""
        try:
            st = os.stat("journal", dir_fd=root_fd, follow_symlinks=False)
        except FileNotFoundError:
            return []
        if not stat.S_ISDIR(st.st_mode):
            raise NotACacheError(
                f"{self.journal_dir} is not a directory (a symlink?): gc cannot tell which "
                "objects are in use; nothing was deleted"
            )
        found = []
        with _subdir(root_fd, "journal", report.unknown) as journal:
            if journal is None:
                return []
            with os.scandir(journal) as it:
                for e in sorted(it, key=lambda e: e.name):
                    if not (FLAT["journal"].match(e.name) and e.is_file(follow_symlinks=False)):
                        if not TEMP.match(e.name):
                            report.unknown.append(f"journal/{e.name}")
                        continue
                    with contextlib.suppress(OSError, ValueError):
                        data = json.loads(read_capped(self.journal_dir / e.name, JSON_CAP))
                        if isinstance(data, dict):
                            found.append((e.name, data))
        return found

    def gc(self, dry_run: bool = False) -> Report:
        """Delete objects no known recipe's latest build uses, and stray temp files."""
        report = Report()
        with self._delete_root(report) as root:
            if root is None:
                return report
            keep = self.live_keys(root, dry_run, report)
            stale = time.time() - STALE_TMP_SECONDS
            for shard in self._shards(root, report.unknown):
                for key, files in shard.keys.items():
                    if key in keep:
                        continue
                    if "safetensors" in files:
                        report.removed.append(self._entry(key, files["safetensors"]))
                    if not dry_run:
                        report.files += self._remove_entry(shard.fd, key)
                        self._forget_memo(self.hashes._entry(self.object_path(key)).name, root)
                # temp files of killed builds; a day's margin spares ones a running build writes
                for name, st in shard.temps:
                    if not dry_run and st.st_mtime < stale:
                        report.files += unlink_file(shard.fd, name)
            if not dry_run:
                for d in self._output_dirs():  # a build killed while publishing leaves one there
                    report.files += _sweep_temps(d, stale)
        return report

    def _output_dirs(self) -> set[Path]:
        """Directories the journaled builds published outputs into (absolute paths only)."""
        dirs: set[Path] = set()
        for j in self.journal_dir.glob("*.json") if self.journal_dir.is_dir() else []:
            with contextlib.suppress(OSError, ValueError, AttributeError, TypeError, KeyError):
                for out in json.loads(read_capped(j, JSON_CAP)).get("outputs", {}).values():
                    path = Path(out["path"]) if isinstance(out["path"], str) else None
                    if path is not None and path.is_absolute():
                        dirs.add(path.parent)
        return {d for d in dirs if d.is_dir()}

    def verify(self, remove: bool = False) -> Report:
        """Re-hash every entry: bad entries with why, and leftovers of interrupted writes.

        Leftovers (objects without sidecar, sidecars without object, temp files) are never
        used, so they are not failures; with `remove`, both kinds are deleted.
        """
        report = Report()
        with self._delete_root(report) if remove else self._read_root() as root:
            if root is None:
                report.missing = True
                return report
            stale = time.time() - STALE_TMP_SECONDS
            for shard in self._shards(root, report.unknown):
                for key, files in shard.keys.items():
                    path = self.object_path(key)
                    if len(files) == 1:
                        leftover = path if "safetensors" in files else path.with_suffix(".json")
                        report.leftovers.append(leftover)
                        if remove:
                            report.files += unlink_file(shard.fd, leftover.name)
                        continue
                    why = self.problem(key, memo=False)
                    if why is not None:
                        report.bad.append((self._entry(key, files["safetensors"]), why))
                        if remove:
                            report.files += self._remove_entry(shard.fd, key)
                            self._forget_memo(self.hashes._entry(path).name, root)
                for name, st in shard.temps:
                    report.leftovers.append(self.objects / shard.name / name)
                    # a running build's temp file is young: leave it alone
                    if remove and st.st_mtime < stale:
                        report.files += unlink_file(shard.fd, name)
        return report

    def clean(self) -> Report:
        """Delete every file of the cache by shape, then the marker and the root if empty."""
        report = Report()
        with self._delete_root(report) as root:
            if root is None:
                return report
            for shard in self._shards(root, report.unknown):
                for key in shard.keys:
                    report.files += self._remove_entry(shard.fd, key)
                for name, _ in shard.temps:
                    report.files += unlink_file(shard.fd, name)
            with _subdir(root, "objects") as objects:
                if objects is not None:
                    _rmdirs(objects, [n for n in _names(objects) if SHARD.match(n)])
            for sub in SUBDIRS[1:]:
                with _subdir(root, sub, report.unknown) as fd:
                    if fd is None:
                        continue
                    for name in _names(fd):
                        if (FLAT[sub].match(name) or TEMP.match(name)) and unlink_file(fd, name):
                            report.files += 1
                        else:
                            report.unknown.append(f"{sub}/{name}")
            removed, odd = clean_store(root)  # downloaded models (fetch/store.py)
            report.files += removed
            report.unknown += odd
            _rmdirs(root, list(SUBDIRS))
            for name in _names(root):
                if name == "models" and odd:
                    continue  # its leftovers are listed already
                if TEMP.match(name) and unlink_file(root, name):
                    report.files += 1
                elif name != MARKER:
                    report.unknown.append(name)
            if _names(root) == [MARKER]:
                unlink_file(root, MARKER)
                with contextlib.suppress(OSError):
                    os.rmdir(self.root)
        return report


@contextlib.contextmanager
def _subdir(
    parent_fd: int, name: str, unknown: list[str] | None = None, prefix: str = ""
) -> Iterator[int | None]:
    """`name` as a real directory (None if absent; a symlink or non-directory is reported in
    `unknown` and never followed)."""
    fd = open_subdir(parent_fd, name)
    if fd is None and unknown is not None:
        with contextlib.suppress(FileNotFoundError):
            os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            unknown.append(f"{prefix}{name} (a symlink or not a directory)")
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def _names(dir_fd: int) -> list[str]:
    with os.scandir(dir_fd) as it:
        return sorted(e.name for e in it)


def _rmdirs(parent_fd: int, names: list[str]) -> None:
    """Remove the empty real directories among `names` (rmdir never follows a symlink)."""
    for name in names:
        with contextlib.suppress(OSError):
            os.rmdir(name, dir_fd=parent_fd)


def _sweep_temps(directory: Path, stale: float) -> int:
    """Delete `.mergebuild-tmp-*` regular files older than `stale` in an output directory
    (which may be a symlink the user made; its entries are never followed)."""
    try:
        fd = open_dir(directory, follow=True)
    except OSError:
        return 0
    removed = 0
    try:
        with os.scandir(fd) as it:
            old = [
                e.name
                for e in it
                if TEMP.match(e.name)
                and e.is_file(follow_symlinks=False)
                and e.stat(follow_symlinks=False).st_mtime < stale
            ]
        for name in old:
            with contextlib.suppress(OSError):
                removed += unlink_file(fd, name)
    finally:
        os.close(fd)
    return removed


def _sidecar(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(read_capped(path.with_suffix(".json"), JSON_CAP))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}
