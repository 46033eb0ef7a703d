"""`mergebuild compare REF MODEL... [--base B] [--by block|component|key] [--png FILE]`.

A model is a file, or `RECIPE.yaml:NAME` for a recipe's output or merge node that is in the
cache (compare never builds: it says which command would). A swept NAME stands for all its
members; with `--png` each sweep also gets one line per group across its members.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergebuild.errors import BuildError


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "compare",
        help="distance of models to a reference per block/component/key (table, JSON, PNG)",
    )
    p.add_argument(
        "models", nargs="+", metavar="MODEL", help="reference first; files or RECIPE:NAME"
    )
    p.add_argument("--base", metavar="MODEL", help="also compare the deltas against this model")
    p.add_argument("--by", choices=["block", "component", "key"], default="block")
    p.add_argument("--png", type=Path, metavar="FILE", help="write a heatmap here")
    p.add_argument("--json", action="store_true", help="print one JSON report on stdout")
    p.add_argument("-j", "--jobs", type=int, default=2, help="reading threads")
    p.add_argument("--cache-dir", type=Path, help="cache of the recipes named in RECIPE:NAME")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def members(spec: str) -> list[str] | None:
    """`RECIPE.yaml:NAME` of a swept node or output: its members' references; else None."""
    recipe_part, sep, name = spec.rpartition(":")
    if Path(spec).is_file() or not (
        sep and recipe_part.endswith((".yaml", ".yml")) and Path(recipe_part).is_file()
    ):
        return None
    from mergebuild.recipe import load_recipe

    recipe = load_recipe(Path(recipe_part), [], allow_outside_paths=True)
    found = recipe.output_members.get(name) or recipe.node_members.get(name)
    return [f"{recipe_part}:{m}" for m in found] if found else None


def resolve(spec: str, cache_dir: Path | None) -> Path:
    """The file behind a model argument."""
    path = Path(spec)
    if path.is_file():
        return path
    recipe_part, sep, name = spec.rpartition(":")
    if not (sep and recipe_part.endswith((".yaml", ".yml")) and Path(recipe_part).is_file()):
        raise BuildError(f"no such file: {spec} (a model file, or RECIPE.yaml:NAME)")
    from mergebuild.cache import CacheStore
    from mergebuild.recipe import load_recipe

    recipe = load_recipe(Path(recipe_part), [], allow_outside_paths=True)
    store = CacheStore(cache_dir)
    if name in recipe.outputs:
        return _built_output(recipe, store, name, spec)
    if name in recipe.nodes:
        return _cached_node(recipe, store, name, spec)
    raise BuildError(f"{spec}: '{name}' is neither an output nor a merge node of {recipe_part}")


def _built_output(recipe: Any, store: Any, name: str, spec: str) -> Path:
    from mergebuild.build import Builder

    plan = Builder(recipe, store, [name]).plan()
    item = next(i for i in plan.items if i.kind == "output" and i.name == name)
    if item.status != "cached":
        raise BuildError(f"{spec} is not built (or out of date): run `mergebuild {recipe.path}`")
    obj = store.object_path(item.key)
    return obj if obj.is_file() else recipe.outputs[name].path


def _cached_node(recipe: Any, store: Any, name: str, spec: str) -> Path:
    from mergebuild.graph import compute_keys
    from mergebuild.locate import resolve_models

    resolved = resolve_models(recipe, list(recipe.models), store.hashes, [])
    keys = compute_keys(recipe, {n: r.hashes.xxh3 for n, r in resolved.items()})
    if not store.has(keys[name]):
        raise BuildError(
            f"{spec} is not in the cache: build the recipe first (`mergebuild {recipe.path}`); "
            "a merge with `cache: false`, or one only inside a single pass, is never kept"
        )
    return store.object_path(keys[name])


def labels(specs: list[str]) -> list[str]:
    """Short names for tables and plots: a file's name, a recipe reference's NAME; the
    argument as given where two would read the same."""
    short = [s.rpartition(":")[2] if ".yaml:" in s or ".yml:" in s else Path(s).name for s in specs]
    return [sh if short.count(sh) == 1 else sp for sh, sp in zip(short, specs, strict=True)]


def cmd_compare(args: argparse.Namespace) -> int:
    from mergebuild.compare import compare, text

    specs: list[str] = []
    sweeps: list[list[int]] = []  # positions in `specs` of each swept argument's members
    for spec in args.models:
        found = members(spec)
        if found is not None:
            sweeps.append(list(range(len(specs), len(specs) + len(found))))
        specs.extend(found or [spec])
    paths = [resolve(m, args.cache_dir) for m in specs]
    base = resolve(args.base, args.cache_dir) if args.base else None
    names = labels(specs)
    result = compare(paths, names, base, args.by, args.jobs)
    if args.base:
        result.base = args.base
    if args.png:
        from mergebuild.compare_plot import heatmap_png

        # the reference is not a compared row: a sweep's lines start at its first compared member
        lines = [[names[i] for i in sweep if i > 0] for sweep in sweeps]
        heatmap_png(result, args.png, [ln for ln in lines if len(ln) > 1])
    if args.json:
        print(json.dumps(result.as_json(), indent=1))
    else:
        print(text(result))
        if args.png:
            print(f"wrote {args.png}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"compare": cmd_compare}
