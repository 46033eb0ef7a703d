"""Cache entry locks held while a build writes: a second build of the same keys waits, then
finds them cached.

Apart from execution because the locks span the whole build (re-plan, every pass, the
sidecars) and hold one open file each, which is what makes the open-file limit matter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from mergebuild.cache import CacheStore


@contextlib.contextmanager
def locked(store: CacheStore, keys: list[str], spare_files: int) -> Iterator[None]:
    """Hold the lock of every key (plus room for `spare_files` more open files)."""
    keys = sorted(set(keys))  # fixed order: no deadlock between two builds
    _allow_files(len(keys) + spare_files)  # each held lock is an open file
    with contextlib.ExitStack() as stack:
        for key in keys:
            stack.enter_context(store.lock(key))
        yield


def _allow_files(n: int) -> None:
    """Raise this process's open-file limit (soft, up to the hard one) to hold `n` files.

    A 1000-node chain holds a lock file per node for the whole build; 1024, a common default
    soft limit, then failed with "Too many open files" well before the hard limit.
    """
    try:
        import resource
    except ImportError:  # not a Unix: no such limit to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= n:
        return
    want = n if hard == resource.RLIM_INFINITY else min(n, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
