"""Answer a build that has nothing to do from a stamp, before parsing anything.

A fully cached build used to cost 0.7 s, nearly all imports (pydantic, networkx, the methods),
and make or a script may run it for dozens of recipes. After a successful build, a stamp
records what that build depended on; the next identical command compares it with the
filesystem using only `os.stat` and a hash of the (small) recipe files, and if nothing changed
prints the same summary without loading the recipe. It is as strict as the normal path's own
shortcuts: inputs are trusted by (device, inode, size, mtime) exactly as the hash memo trusts
them, and any doubt (another option, environment variable, recipe byte, lock, input, output or
cache object) falls through to the normal build, which decides and writes a new stamp.

The stamp is a journal-shaped file (journal/<16 hex>.json with the recipe's path), so `cache
gc` drops it with its recipe and never counts it as keeping objects alive.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

import xxhash

from mergebuild import __version__
from mergebuild.errors import MergebuildError
from mergebuild.hashing import stat_signature
from mergebuild.textfile import JSON_CAP, LOCK_CAP, read_capped

FORMAT = 1
ENV_PREFIX = "MERGEBUILD_"


def _sig(path: str | Path) -> list[int] | None:
    """The hash memo's own stat signature (what it trusts an unchanged file by), or None."""
    try:
        return stat_signature(os.stat(path))
    except OSError:
        return None


def _content(path: str | Path) -> str | None:
    """Hash of a recipe or lock file; None for anything unreadable (a FIFO, a device, a huge
    file: read_capped refuses them without blocking), which no stamp matches."""
    try:
        return xxhash.xxh3_128_hexdigest(read_capped(path, LOCK_CAP))
    except OSError:
        return None


def fingerprint(args: Any, root: Path) -> dict[str, Any]:
    """Everything in the command and its environment that can change what a build does."""
    return {
        "version": __version__,
        "cwd": os.getcwd(),
        "recipe": os.path.abspath(args.recipe),
        "outputs": list(args.outputs or []),
        "overrides": list(args.overrides),
        "models": [os.path.abspath(p) for p in args.models],
        "allow_outside_paths": bool(args.allow_outside_paths),
        "device": args.device,
        "cache": str(root),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIX)},
    }


def _stamp_path(root: Path, recipe: str) -> Path:
    name = xxhash.xxh3_64_hexdigest(f"noop\0{recipe}".encode())
    return root / "journal" / f"{name}.json"


def _root(args: Any) -> Path:
    from mergebuild.cache import default_root

    return Path(args.cache_dir or default_root()).expanduser().absolute()


def answer(args: Any) -> bool:
    """True if the stamp shows nothing changed; the summary (or `-n` plan) is then printed."""
    root = _root(args)
    try:
        raw = read_capped(_stamp_path(root, os.path.abspath(args.recipe)), JSON_CAP)
        stamp = json.loads(raw)["stamp"]
        if stamp["format"] != FORMAT or stamp["fingerprint"] != fingerprint(args, root):
            return False
        if not (_healthy_root(root) and _unchanged(stamp)):
            return False
        items = stamp["items"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    _print(args, items, stamp["outputs"])
    return True


def _healthy_root(root: Path) -> bool:
    """What the normal path checks before it trusts a cache: the marker (an unmarked cache is
    adopted or refused there) and real directories below the root (no planted symlink)."""
    from mergebuild.cacheroot import MARKER

    try:
        if not stat.S_ISREG(os.lstat(root / MARKER).st_mode):
            return False
        return all(
            stat.S_ISDIR(os.lstat(root / d).st_mode) for d in ("objects", "journal", "locks")
        )
    except OSError:
        return False


def _unchanged(stamp: dict[str, Any]) -> bool:
    for path, (sig, content) in stamp["files"].items():
        if _sig(path) != sig or (sig is not None and _content(path) != content):
            return False
    for path, sig in stamp["models"].items():
        if sig is None or _sig(path) != sig:
            return False
    for out in stamp["outputs"]:
        if _sig(out["path"]) != out["stat"] or _sig(out["object"]) != out["object_stat"]:
            return False
    return all(
        os.path.isfile(obj) and os.path.isfile(obj.removesuffix(".safetensors") + ".json")
        for obj in [*stamp["objects"], *(o["object"] for o in stamp["outputs"])]
    )


def _print(args: Any, items: list[list[str]], outputs: list[dict[str, Any]]) -> None:
    if args.quiet:
        return
    if args.dry_run:
        for kind, name, reason in items:
            label = name if kind == "merge" else f"{name} (output)"
            print(f"{'cached':<7} {label:<32} {reason}")
        print(f"0 to build, {len(items)} cached")
        return
    paths = ", ".join(o["path"] for o in outputs)
    print(f"0 built, {len(items)} cached in 0.0 s → {paths} (nothing changed since the last build)")
    sys.stdout.flush()


def record(args: Any, builder: Any, plan: Any) -> None:
    """After a successful build: the stamp the next identical command is answered from."""
    from mergebuild.atomic import write_bytes
    from mergebuild.lockfile import lock_path

    root = builder.store.root
    recipe = builder.recipe
    files = {}
    for p in [*recipe.sources, lock_path(recipe)]:
        files[str(p)] = (_sig(p), _content(p))
    models = {str(path): sig for path, sig in plan.models.values()}
    outputs, objects, items = [], [], []
    for item in plan.items:
        if item.kind == "output":
            obj = builder.store.object_path(item.key)
            outputs.append(
                {"path": str(item.path), "stat": _sig(item.path),
                 "object": str(obj), "object_stat": _sig(obj)}
            )  # fmt: skip
            items.append(["output", item.name, "in cache"])
        else:
            if item.stored:
                objects.append(str(builder.store.object_path(item.key)))
            why = "in cache" if item.stored else "not needed: downstream cached"
            if recipe.nodes[item.name].method == "fold":  # as plan.py says it
                from mergebuild.recipe.fold import describe

                why += f"; {describe(recipe, item.name)}"
            items.append(["merge", item.name, why])
    if any(o["stat"] is None or o["object_stat"] is None for o in outputs):
        return
    stamp = {
        "format": FORMAT,
        "created": time.time(),
        "fingerprint": fingerprint(args, root),
        "files": files,
        "models": models,
        "outputs": outputs,
        "objects": objects,
        "items": items,
    }
    doc = {"recipe": str(recipe.path), "stamp": stamp}
    try:
        builder.store.real_dir("journal")
        write_bytes(_stamp_path(root, os.path.abspath(args.recipe)), json.dumps(doc).encode())
    except (OSError, ValueError, MergebuildError):
        pass  # a stamp only saves time: a read-only cache must not fail the build
