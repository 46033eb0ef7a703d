"""Options shared by several command groups, and the Builder made from the build options.

A module of its own so that every command group imports it and none imports another group's
module for these (that was the cli.py <-> cli_share.py import cycle).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G)") from None


def common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="cache directory (default: $MERGEBUILD_CACHE_DIR or the user cache dir)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def models_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="also look here for models pinned by sha256 (repeatable)",
    )


def allow_outside(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-outside-paths",
        action="store_true",
        help="let the recipe write outputs outside its own directory",
    )


def build_options(b: argparse.ArgumentParser) -> None:
    """Options of every command that builds: build, lock, verify."""
    b.add_argument(
        "-n",
        "--dry-run",
        action="store_true",
        help="show what would be built and why; build nothing",
    )
    b.add_argument("--json", action="store_true", help="print one JSON report on stdout")
    b.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME.PARAM=VALUE",
        dest="overrides",
        help="override a merge parameter or output field",
    )
    b.add_argument("-q", "--quiet", action="store_true", help="no progress or summary")
    b.add_argument("-j", "--jobs", type=int, default=2, help="worker threads (default 2)")
    b.add_argument(
        "--max-memory",
        type=size,
        default=size("1G"),
        help="bound on tensor bytes in flight (default 1G); read buffers: min(96M, half)",
    )
    b.add_argument("--device", default="cpu", help="where to compute: cpu (default) or cuda[:N]")
    models_option(b)
    allow_outside(b)
    common(b)
    from mergebuild.remote.config import add_options

    add_options(b)


def open_store(args: argparse.Namespace) -> Any:
    from mergebuild.cache import CacheStore

    return CacheStore(args.cache_dir)


def make_builder(args: argparse.Namespace, outputs: list[str] | None, check_lock: bool) -> Any:
    """Load the recipe and its lock; a Builder set up from the build options."""
    from mergebuild.build import Builder
    from mergebuild.lockfile import locked_inputs, read_lock
    from mergebuild.progress import Progress
    from mergebuild.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides, args.allow_outside_paths)
    human = sys.stderr if args.json else sys.stdout
    builder = Builder(
        recipe,
        open_store(args),
        recipe.select_outputs(outputs),  # a swept output's name: all its members
        jobs=max(1, args.jobs),
        max_memory=args.max_memory,
        progress=Progress(enabled=not args.quiet, stream=human),
        device=args.device,
        model_dirs=args.models,
        locked_inputs=locked_inputs(read_lock(recipe)) if check_lock else None,
    )
    from mergebuild.remote.attach import attach

    attach(args, builder)
    return builder
