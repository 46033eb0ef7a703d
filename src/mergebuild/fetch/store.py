"""The content-addressed model store: `<cache>/models/sha256/<hex><suffix>`.

A downloaded model is named by its SHA-256, so finding it again is one `stat`, never a search,
and two recipes pinning the same bytes share one file. Only files whose bytes were checked
against their name are ever renamed into place. A partial download keeps a fixed name
(`.mergebuild-tmp-<hex>.part`) so the next run finds and continues it; a lock on it keeps two
processes from writing one partial at once. Downloaded inputs are not build products: `cache
gc` leaves this folder alone (a re-download costs more than a rebuild); `cache clean` empties it.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from mergebuild.atomic import TMP_PREFIX
from mergebuild.fetch.sources import MODEL_SUFFIXES

SHA256 = re.compile(r"[0-9a-f]{64}\Z")
SUBDIR = ("models", "sha256")


def store_dir(cache_root: Path) -> Path:
    """Where downloaded models live (not created here)."""
    return cache_root.joinpath(*SUBDIR)


def stored_model(cache_root: Path, sha256: str) -> Path | None:
    """The stored file for a full SHA-256, if it was downloaded before."""
    if not SHA256.match(sha256):
        return None
    d = store_dir(cache_root)
    for suffix in MODEL_SUFFIXES:
        path = d / f"{sha256}{suffix}"
        if path.is_file():
            return path
    return None


def partial_name(sha256: str) -> str:
    return f"{TMP_PREFIX}{sha256}.part"


STORED = re.compile(r"[0-9a-f]{64}(" + "|".join(re.escape(s) for s in MODEL_SUFFIXES) + r")\Z")


def clean_store(root_fd: int) -> tuple[int, list[str]]:
    """`cache clean`'s part: delete the store's downloads and partials, by exact name shape,
    through real directories only (cacheroot's rules); (files removed, names left alone)."""
    from mergebuild.cacheroot import TEMP, open_subdir, unlink_file

    removed, unknown = 0, []
    models = open_subdir(root_fd, SUBDIR[0])
    if models is None:
        return 0, []
    try:
        sha = open_subdir(models, SUBDIR[1])
        if sha is not None:
            try:
                for name in sorted(os.listdir(sha)):
                    if (STORED.match(name) or TEMP.match(name)) and unlink_file(sha, name):
                        removed += 1
                    else:
                        unknown.append(f"{'/'.join(SUBDIR)}/{name}")
            finally:
                os.close(sha)
        for d, parent in ((SUBDIR[1], models), (SUBDIR[0], root_fd)):
            with contextlib.suppress(OSError):
                os.rmdir(d, dir_fd=parent)
    finally:
        os.close(models)
    return removed, unknown
