"""make integration: a depfile (`mergebuild deps`) and includable rules (`mergebuild makefile`).

make decides from mtimes, in milliseconds, whether an output is up to date, so a project of
many recipes does not start one mergebuild per recipe to learn that nothing changed. Each
output depends on what can change its bytes: the recipe and every recipe it includes, its lock
file, and the model files its merges read (models pinned only by hash are located through the
search paths, hashing what is not memoized). mergebuild's own cache stays the judge: when make
runs it after a `touch`, the build is a cache hit and the rule touches the output so the next
make is a no-op.

Concurrent rules (`make -j`) that share intermediates wait for each other on the cache's
per-key locks; each intermediate is still built once.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from mergebuild.errors import BuildError
from mergebuild.graph import build_graph
from mergebuild.hashing import HashMemo
from mergebuild.lockfile import lock_path
from mergebuild.recipe.model import Recipe

_UNSAFE = re.compile(r"[\n\r\t:;|&<>`\"'\\]|\$\(")


@dataclass(frozen=True)
class OutputDeps:
    name: str
    target: Path
    prerequisites: list[Path]  # recipe files first, then the lock, then model files


def output_deps(
    recipe: Recipe, memo: HashMemo, model_dirs: list[Path], cache_root: Path | None = None
) -> list[OutputDeps]:
    """What each output's bytes depend on, as files (a downloaded model: its file in the
    cache's model store, once `mergebuild fetch` put it there)."""
    g = build_graph(recipe)
    files = list(recipe.sources)
    lock = lock_path(recipe)
    if lock.is_file():
        files.append(lock)
    # a model with a path is that file, existing or not (another rule may make it); only
    # models pinned by hash alone are looked up
    pinned = [n for n, m in recipe.models.items() if m.path is None]
    found: dict[str, Path] = {}
    if pinned:
        from mergebuild.locate import resolve_models

        resolved = resolve_models(recipe, pinned, memo, model_dirs, cache_root)
        found = {n: r.path for n, r in resolved.items()}
    out = []
    for name, spec in recipe.outputs.items():
        models = sorted(n for k, n in nx.ancestors(g, ("output", name)) if k == "model")
        paths = [found.get(n) or recipe.models[n].path for n in models]
        unique = list(dict.fromkeys([*files, *(p for p in paths if p is not None)]))
        out.append(OutputDeps(name, spec.path, unique))
    return out


def make_path(path: Path) -> str:
    """`path` relative to the working directory where that is shorter, escaped for make."""
    rel = os.path.relpath(path)
    text = rel if not rel.startswith("../../..") else str(path)
    if _UNSAFE.search(text):
        raise BuildError(
            f"{text}: make cannot name this file (it holds a colon, quote, backslash, "
            "semicolon or newline); rename it to use mergebuild from make"
        )
    return text.replace("$", "$$").replace("#", r"\#").replace(" ", r"\ ")


def depfile(deps: list[OutputDeps]) -> str:
    """One `target: prerequisites` line per output, then an empty rule per model file (as
    `gcc -MP` does) so a deleted input reaches mergebuild, which says what is missing."""
    lines = [
        f"{make_path(d.target)}: {' '.join(make_path(p) for p in d.prerequisites)}" for d in deps
    ]
    inputs = dict.fromkeys(p for d in deps for p in d.prerequisites)
    lines += ["", *(f"{make_path(p)}:" for p in inputs)]
    return "\n".join(lines) + "\n"


def rules(recipe: Recipe, deps: list[OutputDeps], command: str = "$(MERGEBUILD)") -> str:
    """Rules to `include`: one per output, building that output alone."""
    head = [
        f"# mergebuild rules for {make_path(recipe.path)}: `include` this file; regenerate it",
        "# (mergebuild makefile RECIPE) when the recipe's outputs or models change.",
        "MERGEBUILD ?= mergebuild",
        f"MERGEBUILD_OUTPUTS += {' '.join(make_path(d.target) for d in deps)}",
        "",
    ]
    body = []
    for d in deps:
        body += [
            f"{make_path(d.target)}: {' '.join(make_path(p) for p in d.prerequisites)}",
            f"\t{command} build {make_path(recipe.path)} {_name(d.name)} -q",
            "\t@touch -c $@",
            "",
        ]
    every = dict.fromkeys(p for d in deps for p in d.prerequisites)
    models = [p for p in every if p not in recipe.sources]
    if models:
        body += [f"{' '.join(make_path(p) for p in models)}:", ""]
    return "\n".join(head + body)


def _name(name: str) -> str:
    """The name as one shell word: a sweep member's brackets quoted, so the shell never
    takes `nsfw[alpha=0.25]` for a glob pattern."""
    if not re.fullmatch(r"[A-Za-z0-9_.,\-\[\]=]+", name):
        raise BuildError(f"output '{name}': make rules need output names of letters, digits, _.-")
    return f"'{name}'" if "[" in name else name
