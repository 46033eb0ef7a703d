"""`RECIPE.lock`: the exact inputs and outputs of a recipe, for sharing and `verify`.

Next to `foo.yaml` lives `foo.lock` (YAML, like `dvc.lock` beside `dvc.yaml`): the SHA-256 and
size of every input and output, the canonical form and key of every node, and the mergebuild
version. A build with a lock refuses inputs whose bytes differ from it; `verify` rebuilds and
compares outputs against it. Paths in it are relative to the recipe, so it can be published.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from mergebuild import __version__
from mergebuild.atomic import write_bytes
from mergebuild.errors import BuildError
from mergebuild.recipe.model import Recipe
from mergebuild.textfile import LOCK_CAP, read_capped_text

LOCK_FORMAT = 1
MAX_VALUES = 1_000_000  # values in a lock once YAML aliases are expanded (an alias bomb stops)

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Key = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]  # xxh3-128
Size = Annotated[int, Field(ge=0)]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class LockedModel(_Entry):
    sha256: Sha256
    size: Size
    path: str | None = None
    urls: list[str] | None = None  # where the recipe downloads it from (fetch/)
    hf: str | None = None


class LockedNode(_Entry):
    model_config = ConfigDict(extra="allow")  # the node's canonical form: method, params...
    key: Key
    inputs: dict[str, str]


class LockedOutput(_Entry):
    source: str = Field(alias="from")
    path: str | None = None
    sha256: Sha256
    size: Size


class LockFile(_Entry):
    """What `make_lock` writes; a lock that differs in any entry is refused, never half-used."""

    mergebuild_lock: Literal[1]
    mergebuild_version: str
    recipe: str
    models: dict[str, LockedModel]
    nodes: dict[str, LockedNode]
    outputs: dict[str, LockedOutput]


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
    except RecursionError:
        raise BuildError(f"lock file {path} is nested too deeply") from None
    if not isinstance(data, dict) or data.get("mergebuild_lock") != LOCK_FORMAT:
        raise BuildError(
            f"{path} is not a mergebuild lock file (format {LOCK_FORMAT}); "
            "delete it or run `mergebuild lock` to rewrite it"
        )
    if _count_values(data, MAX_VALUES) > MAX_VALUES:
        raise BuildError(f"lock file {path} expands to more than {MAX_VALUES:,} values")
    try:
        LockFile.model_validate(data)
    except ValidationError as e:
        raise BuildError(f"lock file {path} is malformed:\n  " + _problems(e)) from None
    return data


def _count_values(data: Any, cap: int) -> int:
    """Values in `data`, aliases counted each time they are used; stops past `cap`."""
    n, stack = 0, [data]
    while stack and n <= cap:
        v = stack.pop()
        n += 1
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return n


def _problems(err: ValidationError, limit: int = 10) -> str:
    """Each bad entry by its place in the lock (`models.anything.sha256`), one a line."""
    from mergebuild.extract import one_line

    lines = []
    for e in err.errors()[:limit]:
        where = ".".join("from" if x == "source" else str(x) for x in e["loc"])
        got = e.get("input")
        shown = "" if isinstance(got, dict | list) else f" (got {one_line(repr(got), 80)})"
        msg = e["msg"]
        if "pattern" in msg and "sha256" in where:
            msg = "expected 64 lowercase hex digits (a SHA-256)"
        elif "pattern" in msg:
            msg = "expected 32 lowercase hex digits (a node key)"
        lines.append(f"{one_line(where, 200)}: {msg}{shown}")
    more = len(err.errors()) - limit
    return (
        "\n  ".join(lines)
        + (f"\n  … and {more} more" if more > 0 else "")
        + ("\n(restore the published lock, or rebuild with `mergebuild lock` to rewrite it)")
    )


def locked_inputs(lock: dict[str, Any] | None) -> dict[str, str] | None:
    if lock is None:
        return None
    return {name: m["sha256"] for name, m in lock["models"].items()}  # read_lock checked it


def _rel(recipe: Recipe, path: Path | None) -> str | None:
    return None if path is None else os.path.relpath(path, recipe.directory)


def _sources(recipe: Recipe, name: str) -> dict[str, Any]:
    """A model's `urls` / `hf`, so the published lock says where to get each input too."""
    m = recipe.models[name]
    return {**({"urls": list(m.urls)} if m.urls else {}), **({"hf": m.hf} if m.hf else {})}


def make_lock(recipe: Recipe, plan: Any, outputs: dict[str, tuple[str, int]]) -> dict[str, Any]:
    """The lock of a finished build: `outputs` maps output name → (sha256, size)."""
    from mergebuild.graph import named_inputs, node_identity

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
                **_sources(recipe, name),
            }
            for name, r in sorted(plan.inputs.items())
        },
        "nodes": {
            name: {
                **node_identity(recipe, name, plan.keys),
                "inputs": named_inputs(recipe, name, plan.keys),
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
        data,
        sort_keys=True,
        allow_unicode=False,  # escaped: a raw U+0085 in a path would read back as a break
        width=100,
    )
    write_bytes(path, text.encode())
    return path
