"""One command's use of the remote cache: lookups for the planner, pushes after a build.

The first failure of the remote itself (down, credentials refused, no bucket) turns it off for
the rest of the command with one warning, so a build never waits on a dead server node after
node; with `required` it is an error instead. A bad entry only costs that entry.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from mergebuild.errors import BuildError
from mergebuild.remote.config import Settings
from mergebuild.remote.store import RemoteCache, RemoteEntryBad, RemoteUnavailable
from mergebuild.textfile import JSON_CAP, read_capped

if TYPE_CHECKING:
    from mergebuild.cache import CacheStore


LOCK_WAIT = 600.0  # seconds to wait for another process's download or build of a key


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


class Session:
    def __init__(
        self,
        settings: Settings,
        store: CacheStore,
        dry_run: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.settings, self.store, self.dry_run = settings, store, dry_run
        self.remote = RemoteCache(settings.url, settings.options)
        self.log = log or (lambda _: None)
        self.fetched: dict[str, str] = {}  # key → why it counts as cached (a remote hit)
        self.asked: set[str] = set()  # each key is asked once per command
        self.bad: set[str] = set()  # remote entries found corrupt: a push replaces them
        self.down = False
        self._probed = False

    def _probe(self, create: bool = False) -> None:
        if not self._probed:
            self.remote.probe(create=create)
            self._probed = True

    def _fail(self, e: RemoteUnavailable) -> None:
        if self.settings.required:
            raise BuildError(f"remote cache {self.settings.url} cannot be used: {e}")
        if not self.down:
            warnings.warn(
                f"remote cache {self.settings.url} cannot be used ({e}); going on without it",
                stacklevel=1,
            )
        self.down = True

    def lookup(self, name: str, key: str) -> str | None:
        """The planner's hook, for a key it needs: a remote hit is downloaded into the store
        (only reported, with `dry_run`). Returns why it counts as cached, None: not remote."""
        if key in self.fetched:
            return self.fetched[key]
        if self.down or key in self.asked or self.store.has(key):
            return None
        self.asked.add(key)
        try:
            self._probe(create=self.settings.push)
            info = self.remote.sidecar(key)
            if info is None:
                return None
            if self.dry_run:
                self.fetched[key] = f"remote hit ({_mb(info['size'])} to download)"
                return self.fetched[key]
            t0 = time.perf_counter()
            from filelock import Timeout

            try:  # one downloader per key; a builder's result wins
                lock = self.store.lock(key).acquire(timeout=LOCK_WAIT)
            except Timeout:
                return None  # held all this time: build it the usual way (which waits)
            with lock:
                if self.store.has(key):
                    return None
                from mergebuild.remote.fetch import fetch

                resumed = fetch(self.remote, self.store, key, info)
        except RemoteEntryBad as e:
            warnings.warn(
                f"remote cache entry {key} ('{name}') not used: {e}; building it locally",
                stacklevel=1,
            )
            self.bad.add(key)
            return None
        except RemoteUnavailable as e:
            self._fail(e)
            return None
        seconds = time.perf_counter() - t0
        more = f", resumed at {_mb(resumed)}" if resumed else ""
        self.fetched[key] = f"remote hit: pulled {_mb(info['size'])} in {seconds:.1f} s{more}"
        self.log(f"pulled {name} from the remote cache ({_mb(info['size'])}, {seconds:.1f} s)")
        return self.fetched[key]

    def push(self, entries: Iterable[tuple[str, str]]) -> tuple[int, int]:
        """Upload the (name, key) entries the local store has and the remote lacks (or has
        corrupt). Returns (uploaded, already there)."""
        uploaded = there = 0
        if self.down:
            return 0, 0
        try:
            if self.remote.http:
                raise RemoteUnavailable("an http(s) remote is read-only: push to its source")
            self._probe(create=True)
            for name, key in entries:
                if key in self.fetched or not self.store.has(key):
                    continue
                if self.store.problem(key) is not None:
                    continue  # a corrupt local entry is never shared
                if key not in self.bad:
                    try:
                        if self.remote.sidecar(key) is not None:
                            there += 1
                            continue
                    except RemoteEntryBad:
                        pass  # replaced below
                path = self.store.object_path(key)
                sidecar = read_capped(path.with_suffix(".json"), JSON_CAP)
                t0 = time.perf_counter()
                self.remote.upload(key, path, sidecar)
                size = path.stat().st_size
                self.log(
                    f"pushed {name} to the remote cache ({_mb(size)}, "
                    f"{time.perf_counter() - t0:.1f} s)"
                )
                uploaded += 1
        except RemoteUnavailable as e:
            self._fail(e)
        return uploaded, there
