"""The content-addressed model store: `<cache>/models/sha256/<hex><suffix>`.

A downloaded model is named by its SHA-256, so finding it again is one `stat`, never a search,
and two recipes pinning the same bytes share one file. Only files whose bytes were checked
against their name are ever renamed into place. A partial download keeps a fixed name
(`.mergebuild-tmp-<hex>.part`) so the next run finds and continues it; a lock on it keeps two
processes from writing one partial at once. Downloaded inputs are not build products: `cache
gc` and `cache clean` leave this folder alone (a re-download costs more than a rebuild).
"""

from __future__ import annotations

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
