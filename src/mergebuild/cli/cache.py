"""`mergebuild cache ls|du|gc|clean|verify|adopt`: inspect or prune the cache.

Only reads and deletes inside a marked cache directory (the rules live in cache.py); this module
only turns the store's reports into lines or JSON.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from mergebuild.cli.options import common, open_store


def add_parsers(sub: Any) -> None:
    c = sub.add_parser(
        "cache",
        help="inspect or prune the cache",
        description="gc, clean and verify --remove delete only inside a directory marked as a "
        "mergebuild cache (CACHEDIR.TAG), never through a symlink, and only files named like "
        "the cache's own; `adopt` marks a cache made by an older mergebuild.",
    )
    c.add_argument("action", choices=["ls", "du", "gc", "clean", "verify", "adopt"])
    c.add_argument("-n", "--dry-run", action="store_true", help="gc: list what would go")
    c.add_argument(
        "--remove", action="store_true", help="verify: delete entries that fail the check"
    )
    c.add_argument("--json", action="store_true")
    c.add_argument(
        "--remote", nargs="?", const="", metavar="URL", help="ls: the remote cache's entries"
    )
    common(c)


def cmd_cache(args: argparse.Namespace) -> int:
    if args.remote is not None and args.action == "ls":
        from mergebuild.remote.commands import cmd_ls_remote

        return cmd_ls_remote(args.remote or None, args.json)
    store = open_store(args)
    if args.action == "verify":
        return _cache_verify(store, args.remove, args.json)
    if args.action == "adopt":
        return _cache_adopt(store)
    if args.action == "clean":
        report = store.clean()
        if report.missing:
            print(f"no cache at {store.root}: nothing to remove")
        elif report.unknown:
            print(f"removed {report.files} files of the cache in {store.root}")
        else:
            print(f"removed the cache at {store.root} ({report.files} files)")
        _left_alone(report.unknown)
        return 0
    if args.action == "gc":
        report = store.gc(dry_run=args.dry_run)
        if report.missing:
            print(f"no cache at {store.root}: nothing to remove")
            return 0
        verb = "would remove" if args.dry_run else "removed"
        for e in report.removed:
            print(
                f"{verb} {e.key} {e.info.get('kind', '?'):<6} {e.info.get('name', '?'):<24} "
                f"{e.size / 1e6:,.1f} MB"
            )
        size = sum(e.size for e in report.removed) / 1e6
        print(f"{verb} {len(report.removed)} objects, {size:,.1f} MB")
        _left_alone(report.unknown)
        return 0
    entries = list(store.entries())
    total = sum(e.size for e in entries)
    if args.json:
        print(
            json.dumps(
                {
                    "root": str(store.root),
                    "bytes": total,
                    "objects": [{"key": e.key, "size": e.size, **e.info} for e in entries],
                },
                indent=1,
            )
        )
        return 0
    if args.action == "ls":
        for e in entries:
            print(
                f"{e.key}  {e.info.get('kind', '?'):<6} {e.info.get('name', '?'):<28} "
                f"{e.size / 1e6:>10,.1f} MB  {e.info.get('recipe', '')}"
            )
    print(f"{len(entries)} objects, {total / 1e6:,.1f} MB in {store.root}")
    return 0


def _left_alone(unknown: list[str], limit: int = 20) -> None:
    """Files in the cache not named like its own: reported, never deleted."""
    for name in unknown[:limit]:
        print(f"unknown file, left alone: {name}")
    if len(unknown) > limit:
        print(f"... and {len(unknown) - limit} more unknown files, left alone")


def _cache_adopt(store: Any) -> int:
    """Mark a cache made before markers existed (only if it holds nothing but cache files)."""
    from mergebuild.cacheroot import MARKER
    from mergebuild.errors import BuildError

    if not store.root.is_dir():
        raise BuildError(f"no directory at {store.root}: nothing to adopt")
    had = (store.root / MARKER).is_file()
    store.ensure_marker()
    print(f"{store.root} {'is already' if had else 'is now'} marked as a mergebuild cache")
    return 0


def _cache_verify(store: Any, remove: bool, as_json: bool) -> int:
    """Re-hash every cache entry against its checksum; exit 1 if any is corrupted."""
    checked = sum(1 for e in store.entries() if e.info)
    report = store.verify(remove=remove)
    bad, leftovers = report.bad, report.leftovers
    if as_json:
        out = {
            "root": str(store.root),
            "bad": [{"key": e.key, "name": e.info.get("name"), "problem": why} for e, why in bad],
            "leftovers": [str(p) for p in leftovers],
            "unknown": report.unknown,
            "removed": remove,
        }
        print(json.dumps(out, indent=1))
    else:
        for e, why in bad:
            print(f"{'removed' if remove else 'BAD'} {e.key} {e.info.get('name', '?')}: {why}")
        extra = f", {len(leftovers)} leftovers of interrupted writes" if leftovers else ""
        print(f"{checked} objects checked, {len(bad)} corrupted{extra}")
        _left_alone(report.unknown)
    return 1 if bad else 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"cache": cmd_cache}
