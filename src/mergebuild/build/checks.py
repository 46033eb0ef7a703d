"""Refusals around a build: inputs that differ from RECIPE.lock, outputs that would overwrite
an input, the lock file or the cache's own files, inputs that changed while being read, and a
device that is not there.

Apart from planning and execution because each is a safety rule with its own message, and
these are the lines to read when asking "what can a build never do?".
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from mergebuild.cache import CacheStore
from mergebuild.cacheroot import MARKER, SUBDIRS
from mergebuild.errors import BuildError
from mergebuild.hashing import stat_signature
from mergebuild.locate import ResolvedInput
from mergebuild.recipe.model import Recipe

_CACHE_NAMES = (*SUBDIRS, MARKER)  # the cache's own layout: never an output


def check_outputs_spare_inputs(
    recipe: Recipe, store: CacheStore, outputs: list[str], resolved: dict[str, ResolvedInput]
) -> None:
    """A model found by hash may live where an output goes: never write over it. Nor over
    the cache's own files (objects, sidecars, journals, memos: `cache gc` would delete the
    output, or the output would corrupt the cache). And `lock` writes RECIPE.lock: it must
    not be an input."""
    from mergebuild.lockfile import lock_path

    real = {os.path.realpath(r.path): n for n, r in resolved.items()}
    lock = os.path.realpath(lock_path(recipe))
    if lock in real:
        raise BuildError(
            f"input model '{real[lock]}' is the recipe's lock file path {lock}; rename the model"
        )
    cache = [os.path.realpath(store.root / d) for d in _CACHE_NAMES]
    for name in outputs:
        path = recipe.outputs[name].path
        hit = real.get(os.path.realpath(path))
        if hit is not None:
            raise BuildError(
                f"output '{name}' ({path}) is the file of input model '{hit}'; writing it "
                "would destroy the input"
            )
        lands = os.path.join(os.path.realpath(path.parent), path.name)
        if any(lands == d or lands.startswith(d + os.sep) for d in cache):
            raise BuildError(
                f"output '{name}' ({path}) is inside the cache's own files "
                f"({store.root}); write outputs elsewhere"
            )


def check_lock(resolved: dict[str, ResolvedInput], locked_inputs: dict[str, str] | None) -> None:
    """With a lock file, every input must be the exact file the lock recorded."""
    if locked_inputs is None:
        return
    bad = []
    for name, r in resolved.items():
        want = locked_inputs.get(name)
        if want is None:
            warnings.warn(
                f"model '{name}' is not in the lock file; `mergebuild lock` records it",
                stacklevel=2,
            )
        elif want != r.hashes.sha256:
            bad.append(
                f"model '{name}': {r.path} has sha256 {r.hashes.sha256}, "
                f"the lock file expects {want}"
            )
    if bad:
        raise BuildError(
            "inputs differ from the lock file:\n  "
            + "\n  ".join(bad)
            + "\n(rebuild with --update-lock to accept them, or restore the locked files)"
        )


def check_inputs_unchanged(models: dict[str, tuple[Path, list[int]]]) -> None:
    """Every input still has the stat signature it had when hashed (else nothing is cached)."""
    for name, (path, sig) in models.items():
        try:
            now = stat_signature(path.stat())
        except OSError:
            now = None
        if now != sig:
            raise BuildError(
                f"input model '{name}' ({path}) changed during the build; "
                "nothing was cached — run the build again"
            )


def check_device(device: str) -> str:
    if device == "cpu":
        return device
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BuildError(f"--device {device}: CUDA is not available on this machine")
    return device
