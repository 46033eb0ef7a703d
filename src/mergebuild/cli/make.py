"""`mergebuild deps RECIPE [-o FILE]` and `mergebuild makefile RECIPE`: see makedeps.py."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_parsers(sub: Any) -> None:
    for name, help_text in (
        ("deps", "write a make depfile: each output with the files its bytes depend on"),
        ("makefile", "print make rules (one per output) to `include` in a Makefile"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("recipe", type=Path)
        if name == "deps":
            p.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
        p.add_argument("--models", action="append", type=Path, default=[], metavar="DIR",
                       help="also look here for models pinned by sha256")  # fmt: skip
        p.add_argument("--cache-dir", type=Path, help="where input hashes are memoized")
        p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def cmd_make(args: argparse.Namespace) -> int:
    from mergebuild.atomic import write_bytes
    from mergebuild.cache import CacheStore
    from mergebuild.makedeps import depfile, output_deps, rules
    from mergebuild.recipe import load_recipe

    recipe = load_recipe(args.recipe, [], allow_outside_paths=True)
    store = CacheStore(args.cache_dir)
    deps = output_deps(recipe, store.hashes, args.models, store.root)
    text = depfile(deps) if args.command == "deps" else rules(recipe, deps)
    if getattr(args, "output", None):
        write_bytes(args.output, text.encode())
    else:
        print(text, end="")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"deps": cmd_make, "makefile": cmd_make}
