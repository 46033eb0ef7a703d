"""`RECIPE.lock`: the exact inputs and outputs of a recipe, for sharing and `verify`.

Next to `foo.yaml` lives `foo.lock` (YAML, like `dvc.lock` beside `dvc.yaml`): the SHA-256 and
size of every input and output, the canonical form and key of every node, and the mergebuild
version. A build with a lock refuses inputs whose bytes differ from it; `verify` rebuilds and
compares outputs against it. Paths in it are relative to the recipe, so it can be published.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from mergebuild import __version__
from mergebuild.atomic import write_bytes
from mergebuild.errors import BuildError
from mergebuild.recipe.model import Recipe
from mergebuild.textfile import LOCK_CAP, read_capped_text

LOCK_FORMAT = 1


def lock_path(recipe: Recipe) -> Path:
    return recipe.path.with_suffix(".lock")


def read_lock(recipe: Recipe) -> dict[str, Any] | None:
    path = lock_path(recipe)
    try:
        text = read_capped_text(path, LOCK_CAP, "lock file")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise BuildError(f"cannot read lock file {path}: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise BuildError(f"lock file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or data.get("mergebuild_lock") != LOCK_FORMAT:
        raise BuildError(
            f"{path} is not a mergebuild lock file (format {LOCK_FORMAT}); "
            "delete it or run `mergebuild lock` to rewrite it"
        )
    return data


def locked_inputs(lock: dict[str, Any] | None) -> dict[str, str] | None:
    if lock is None:
        return None
    return {
        name: str(m.get("sha256"))
        for name, m in (lock.get("models") or {}).items()
        if isinstance(m, dict)
    }


def _rel(recipe: Recipe, path: Path | None) -> str | None:
    return None if path is None else os.path.relpath(path, recipe.directory)


def make_lock(recipe: Recipe, plan: Any, outputs: dict[str, tuple[str, int]]) -> dict[str, Any]:
    """The lock of a finished build: `outputs` maps output name → (sha256, size)."""
    from mergebuild.graph import node_identity

    return {
        "mergebuild_lock": LOCK_FORMAT,
        "mergebuild_version": __version__,
        "recipe": recipe.path.name,
        "models": {
            name: {
                "sha256": r.hashes.sha256,
                "size": r.hashes.size,
                # where the recipe says it is; a file found by hash elsewhere is the
                # author's own business (the lock must be publishable)
                "path": _rel(recipe, recipe.models[name].path),
            }
            for name, r in sorted(plan.inputs.items())
        },
        "nodes": {
            name: {
                **node_identity(recipe, name, plan.keys),
                "inputs": dict(recipe.nodes[name].inputs),
                "key": plan.keys[name],
            }
            for name in sorted(recipe.nodes)
            if name in plan.keys
        },
        "outputs": {
            name: {
                "from": recipe.outputs[name].source,
                "path": _rel(recipe, recipe.outputs[name].path),
                "sha256": sha,
                "size": size,
            }
            for name, (sha, size) in sorted(outputs.items())
        },
    }


def write_lock(recipe: Recipe, data: dict[str, Any]) -> Path:
    path = lock_path(recipe)
    text = "# written by `mergebuild lock`; commit it next to the recipe\n" + yaml.safe_dump(
        data, sort_keys=True, allow_unicode=True, width=100
    )
    write_bytes(path, text.encode())
    return path
