"""`mergebuild build RECIPE [OUTPUT...]`, the default command: build and report.

Also the lock a build writes (`--update-lock`; `lock` in share.py is a build plus this).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergebuild import __version__
from mergebuild.cli.options import build_options, make_builder
from mergebuild.errors import BuildError


def add_parsers(sub: Any) -> None:
    b = sub.add_parser("build", help="build a recipe's outputs (the default command)")
    b.add_argument("recipe", type=Path)
    b.add_argument("outputs", nargs="*", metavar="OUTPUT", help="only these outputs")
    build_options(b)
    b.add_argument(
        "--update-lock",
        action="store_true",
        help="accept inputs that differ from RECIPE.lock and rewrite it after the build",
    )
    b.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="ray: build the cache entries as Ray tasks ($RAY_ADDRESS, else a local cluster of "
        "-j CPUs) into a cache dir every worker shares; needs mergebuild[ray]",
    )


def build_report(args: argparse.Namespace, builder: Any, plan: Any, seconds: float) -> dict:
    built = sum(i.status in ("built", "build") for i in plan.items)
    recipe = builder.recipe
    return {
        "recipe": str(recipe.path),
        "cache_dir": str(builder.store.root),
        "dry_run": args.dry_run,
        "mergebuild_version": __version__,
        "nodes": [i.as_json() for i in plan.items],
        "models": {
            n: {
                "key": plan.keys[n],
                "path": str(r.path),
                "sha256": r.hashes.sha256,
                "hashed": n in plan.hashed,
                "hashed_while_merging": n in builder.hashed_while_merging,
                **({"download": True} if n in plan.downloads else {}),
            }
            for n, r in plan.inputs.items()
        },
        "summary": {
            "built" if not args.dry_run else "to_build": built,
            "cached": len(plan.items) - built,
            "seconds": round(seconds, 3),
        },
    }


def output_hashes(builder: Any, plan: Any) -> dict[str, tuple[str, int]]:
    """SHA-256 and size of each published output (memoized: they are cache hardlinks)."""
    out = {}
    for item in plan.items:
        if item.kind == "output":
            h, _ = builder.store.hashes.hashes(builder.recipe.outputs[item.name].path)
            out[item.name] = (h.sha256, h.size)
    return out


def update_lock(builder: Any, plan: Any) -> tuple[Path, dict[str, tuple[str, int]]]:
    """Write the lock of this build; returns its path and the outputs' (sha256, size)."""
    from mergebuild.lockfile import make_lock, read_lock, write_lock

    recipe = builder.recipe
    outputs = output_hashes(builder, plan)
    try:
        old = read_lock(recipe) or {}
    except BuildError as e:  # rewriting is how a broken lock gets fixed: start afresh
        print(f"warning: replacing it: {e}", file=sys.stderr)
        old = {}
    lock = make_lock(recipe, plan, outputs)
    # a subset of outputs was built: what the others use keeps its locked entry
    still = {
        "outputs": set(recipe.outputs),
        "models": set(recipe.models),
        "nodes": set(recipe.nodes),
    }
    for section, names in still.items():
        for name, entry in (old.get(section) or {}).items():
            if name in names and name not in lock[section]:
                lock[section][name] = entry
    return write_lock(recipe, lock), outputs


def cmd_build(args: argparse.Namespace) -> int:
    no_stamp = args.json or args.update_lock or getattr(args, "command", "build") != "build"
    no_stamp = no_stamp or args.push  # a push needs the plan's keys
    if not no_stamp:
        from mergebuild.noop import answer

        if answer(args):
            return 0
    builder = make_builder(args, args.outputs or None, check_lock=not args.update_lock)
    progress = builder.progress
    if args.dry_run:
        plan = builder.plan()
        seconds = 0.0
    else:
        if getattr(args, "executor", "local") == "ray":
            from mergebuild.build.ray_executor import run_on_ray

            plan, seconds = run_on_ray(builder)
        else:
            plan, seconds = builder.run()
        if not no_stamp:
            from mergebuild.noop import record

            record(args, builder, plan)
        if args.update_lock:
            progress.log(f"wrote {update_lock(builder, plan)[0]}")
        if builder.remote is not None and builder.remote.settings.push:
            from mergebuild.remote.commands import push_plan

            push_plan(builder, plan)
    report = build_report(args, builder, plan, seconds)
    built = sum(i.status in ("built", "build") for i in plan.items)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    if args.dry_run:
        from mergebuild.fetch.sources import describe

        for n in plan.downloads:  # a dry run never downloads
            m = builder.recipe.models[n]
            progress.log(f"{'download':<8} {n:<32} {describe(m.urls, m.hf)}")
        for i in plan.items:
            label = i.name if i.kind == "merge" else f"{i.name} (output)"
            progress.log(
                f"{'build' if i.status == 'build' else 'cached':<7} {label:<32} {i.reason}"
            )
        progress.log(f"{built} to build, {len(plan.items) - built} cached")
        return 0
    outs = [f"{i.path}" for i in plan.items if i.kind == "output"]
    progress.log(
        f"{built} built, {len(plan.items) - built} cached in {seconds:.1f} s → {', '.join(outs)}"
    )
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"build": cmd_build}
