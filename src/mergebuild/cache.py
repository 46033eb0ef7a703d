"""The content-addressed store: one safetensors file per key, plus what a build remembers.

Layout under the cache root:
  objects/ab/<key>.safetensors   a node's or output's bytes (outputs are hardlinks to these)
  objects/ab/<key>.json          sidecar: what it is, size, checksum, which recipe built it
  hashes/                        memo of input content keys (see hashing.py)
  journal/<recipe>.json          last build of each recipe: keys and params, for "why" and gc
  locks/<key>.lock               one builder per key across processes
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash
from filelock import FileLock

from mergebuild.atomic import TMP_PREFIX, write_bytes
from mergebuild.errors import BuildError
from mergebuild.hashing import FileHashes, HashMemo, hash_file, stat_signature
from mergebuild.textfile import JSON_CAP, read_capped

ENV_VAR = "MERGEBUILD_CACHE_DIR"
STALE_TMP_SECONDS = 86400
CHECKSUM = "xxh3_128"  # sidecar field: xxh3-128 of the object's bytes, taken at write time


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


class CacheStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_root()).expanduser().absolute()
        self.objects = self.root / "objects"
        self.journal_dir = self.root / "journal"
        self.hashes = HashMemo(self.root / "hashes")

    def object_path(self, key: str) -> Path:
        return self.objects / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        """An object counts only with its sidecar: a build killed between the two left it."""
        path = self.object_path(key)
        return path.is_file() and path.with_suffix(".json").is_file()

    def write_sidecar(self, key: str, info: dict[str, Any], checksum: str | None = None) -> None:
        """Record the object's size and checksum: the one computed while writing, else read
        back right after it was written."""
        path = self.object_path(key)
        sig = stat_signature(path.stat())
        found = FileHashes(checksum, "", "", sig[2]) if checksum else hash_file(path, full=False)
        info = {**info, "key": key, "size": sig[2], CHECKSUM: found.xxh3, "created": time.time()}
        write_bytes(path.with_suffix(".json"), json.dumps(info, indent=1).encode())
        if stat_signature(path.stat()) == sig:
            self.hashes.remember(path, found, sig)  # a cached build need not re-read it

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
        if not isinstance(info, dict) or CHECKSUM not in info or "size" not in info:
            return "no checksum in its sidecar (written by an older mergebuild?)"
        want, size = info[CHECKSUM], info["size"]
        try:
            st = path.stat()
        except FileNotFoundError:
            return "object file missing"
        if st.st_size != size:
            return f"size is {st.st_size} bytes, expected {size} (truncated?)"
        try:
            got = self.hashes.content_key(path)[0] if memo else hash_file(path, full=False).xxh3
        except (BuildError, OSError) as e:
            return f"unreadable ({e})"
        return None if got == want else "checksum mismatch (bytes changed on disk)"

    def remove(self, key: str) -> None:
        """Delete an entry: object first, so a half-removed entry is already 'not present'."""
        path = self.object_path(key)
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)
        self.hashes.forget(path)

    def lock(self, key: str) -> FileLock:
        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        return FileLock(self.root / "locks" / f"{key}.lock")

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
        write_bytes(
            self._journal_path(recipe),
            json.dumps({"recipe": str(recipe), **data}, indent=1).encode(),
        )

    # -- maintenance -----------------------------------------------------------------------

    def entries(self) -> Iterator[Entry]:
        if not self.objects.is_dir():
            return
        for path in sorted(self.objects.glob("*/*.safetensors")):
            if path.name.startswith(TMP_PREFIX):
                continue
            yield Entry(path.stem, path, path.stat().st_size, _sidecar(path))

    def live_keys(self) -> set[str]:
        """Keys used by the latest build of every recipe that still exists."""
        keep: set[str] = set()
        if not self.journal_dir.is_dir():
            return keep
        for j in self.journal_dir.glob("*.json"):
            try:
                data = json.loads(read_capped(j, JSON_CAP))
            except (OSError, ValueError):
                continue
            if not Path(data.get("recipe", "")).is_file():
                j.unlink(missing_ok=True)
                continue
            for section in ("nodes", "outputs"):
                keep |= {v["key"] for v in data.get(section, {}).values() if "key" in v}
        return keep

    def gc(self, dry_run: bool = False) -> list[Entry]:
        """Delete objects no known recipe's latest build uses, and stray temp files."""
        keep = self.live_keys()
        removed = [e for e in self.entries() if e.key not in keep]
        if not dry_run:
            for e in removed:
                self.remove(e.key)
            # temp files of killed builds; a day's margin spares ones a running build still writes
            stale = time.time() - STALE_TMP_SECONDS
            tmps = list(self.objects.glob(f"*/{TMP_PREFIX}*")) if self.objects.is_dir() else []
            for d in self._output_dirs():  # a build killed while publishing leaves one there
                tmps += d.glob(f"{TMP_PREFIX}*")
            for tmp in tmps:
                with contextlib.suppress(OSError):
                    if tmp.lstat().st_mtime < stale:
                        tmp.unlink()
        return removed

    def _output_dirs(self) -> set[Path]:
        """Directories the journaled builds published outputs into."""
        dirs: set[Path] = set()
        for j in self.journal_dir.glob("*.json") if self.journal_dir.is_dir() else []:
            with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
                for out in json.loads(read_capped(j, JSON_CAP)).get("outputs", {}).values():
                    dirs.add(Path(out["path"]).parent)
        return {d for d in dirs if d.is_dir()}

    def verify(self, remove: bool = False) -> tuple[list[tuple[Entry, str]], list[Path]]:
        """Re-hash every entry: (bad entries with why, leftovers of interrupted writes).

        Leftovers (objects without sidecar, sidecars without object, temp files) are never
        used, so they are not failures; with `remove`, both kinds are deleted.
        """
        bad: list[tuple[Entry, str]] = []
        leftovers: list[Path] = []
        if not self.objects.is_dir():
            return bad, leftovers
        for sub in sorted(p for p in self.objects.iterdir() if p.is_dir()):
            for path in sorted(sub.iterdir()):
                orphan = path.suffix == ".json" and not path.with_suffix(".safetensors").exists()
                if orphan or path.name.startswith(TMP_PREFIX):
                    leftovers.append(path)
                elif path.suffix == ".safetensors":
                    if not path.with_suffix(".json").exists():
                        leftovers.append(path)
                        continue
                    why = self.problem(path.stem, memo=False)
                    if why is not None:
                        entry = Entry(path.stem, path, path.stat().st_size, _sidecar(path))
                        bad.append((entry, why))
        if remove:
            for e, _ in bad:
                self.remove(e.key)
            stale = time.time() - STALE_TMP_SECONDS
            for path in leftovers:
                # a running build's temp file is young: leave it alone
                if not path.name.startswith(TMP_PREFIX) or path.stat().st_mtime < stale:
                    path.unlink(missing_ok=True)
        return bad, leftovers

    def clean(self) -> None:
        if self.root.is_dir():
            shutil.rmtree(self.root)


def _sidecar(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(read_capped(path.with_suffix(".json"), JSON_CAP))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}
