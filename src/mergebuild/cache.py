"""The content-addressed store: one safetensors file per key, plus what a build remembers.

Layout under the cache root:
  objects/ab/<key>.safetensors   a node's or output's bytes (outputs are hardlinks to these)
  objects/ab/<key>.json          sidecar: what it is, size, which recipe built it
  hashes/                        memo of input content keys (see hashing.py)
  journal/<recipe>.json          last build of each recipe: keys and params, for "why" and gc
  locks/<key>.lock               one builder per key across processes
"""

from __future__ import annotations

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
from mergebuild.hashing import HashMemo

ENV_VAR = "MERGEBUILD_CACHE_DIR"


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
        return self.object_path(key).is_file()

    def write_sidecar(self, key: str, info: dict[str, Any]) -> None:
        path = self.object_path(key)
        info = {**info, "key": key, "size": path.stat().st_size, "created": time.time()}
        write_bytes(path.with_suffix(".json"), json.dumps(info, indent=1).encode())

    def lock(self, key: str) -> FileLock:
        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        return FileLock(self.root / "locks" / f"{key}.lock")

    # -- journal -------------------------------------------------------------------------

    def _journal_path(self, recipe: Path) -> Path:
        return self.journal_dir / f"{xxhash.xxh3_64_hexdigest(str(recipe).encode())}.json"

    def read_journal(self, recipe: Path) -> dict[str, Any]:
        try:
            data = json.loads(self._journal_path(recipe).read_text())
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
            try:
                info = json.loads(path.with_suffix(".json").read_text())
            except (OSError, ValueError):
                info = {}
            yield Entry(path.stem, path, path.stat().st_size, info)

    def live_keys(self) -> set[str]:
        """Keys used by the latest build of every recipe that still exists."""
        keep: set[str] = set()
        if not self.journal_dir.is_dir():
            return keep
        for j in self.journal_dir.glob("*.json"):
            try:
                data = json.loads(j.read_text())
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
                e.path.unlink(missing_ok=True)
                e.path.with_suffix(".json").unlink(missing_ok=True)
            # temp files of killed builds; a day's margin spares ones a running build still writes
            stale = time.time() - 86400
            for tmp in self.objects.glob(f"*/{TMP_PREFIX}*") if self.objects.is_dir() else []:
                if tmp.stat().st_mtime < stale:
                    tmp.unlink(missing_ok=True)
        return removed

    def clean(self) -> None:
        if self.root.is_dir():
            shutil.rmtree(self.root)
