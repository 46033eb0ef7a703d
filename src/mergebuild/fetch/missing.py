"""Which pinned models have to be downloaded, and downloading them before a build plans.

A model is downloaded only when it is nowhere local: not at its `path`, not in the model
store, not in the search paths (found there by hash, as any pinned model). A model that is
present costs no network at all. `-n` never downloads: such a model gets a placeholder
(its key unknown until its bytes are), so everything built from it shows as "build".
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import xxhash

from mergebuild.errors import BuildError
from mergebuild.fetch.sources import source_suffix
from mergebuild.fetch.store import store_dir
from mergebuild.hashing import FileHashes
from mergebuild.locate import ResolvedInput, resolve_model, search_dirs

if TYPE_CHECKING:
    from mergebuild.cache import CacheStore
    from mergebuild.progress import Progress
    from mergebuild.recipe.model import ModelInput, Recipe


def downloadable(model: ModelInput) -> bool:
    return bool(model.urls or model.hf) and model.sha256 is not None and len(model.sha256) == 64


def absent(
    recipe: Recipe, names: list[str], store: CacheStore, extra_dirs: list[Path] | None
) -> list[str]:
    """The models among `names` that have sources and are not found locally."""
    dirs = search_dirs(recipe, extra_dirs)
    walks: dict = {}
    out = []
    for name in names:
        model = recipe.models[name]
        if not downloadable(model) or (model.path is not None and model.path.exists()):
            continue  # a file at `path` is checked against its pin by the normal resolution
        try:
            resolve_model(model, store.hashes, dirs, walks, store.root)
        except BuildError:
            out.append(name)
    return out


def placeholder(model: ModelInput, cache_root: Path) -> ResolvedInput:
    """What `-n` plans with for a model it would download: its real SHA-256 (the pin), a key
    no cache entry can have."""
    sha = model.sha256 or ""
    key = xxhash.xxh3_128_hexdigest(b"mergebuild-download\0" + sha.encode())
    path = store_dir(cache_root) / f"{sha}{source_suffix(model.urls, model.hf)}"
    return ResolvedInput(model.name, path, FileHashes(key, sha, "", 0), [], memoized=True)


def fetch_missing(
    recipe: Recipe,
    names: list[str],
    store: CacheStore,
    extra_dirs: list[Path] | None,
    progress: Progress,
) -> list[str]:
    """Download every model among `names` that is absent; the names downloaded. All
    failures are reported together."""
    from mergebuild.fetch.download import download

    todo = absent(recipe, names, store, extra_dirs)
    problems = []
    for name in todo:
        try:
            download(recipe.models[name], store, progress)
        except BuildError as e:
            problems.append(str(e))
    if len(problems) == 1:
        raise BuildError(problems[0])
    if problems:
        raise BuildError("cannot download input models:\n  " + "\n  ".join(problems))
    return todo
