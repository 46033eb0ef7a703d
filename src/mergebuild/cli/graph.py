"""`mergebuild graph RECIPE`: print the merge DAG (reads the recipe only, builds nothing)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergebuild.cli.options import allow_outside, common


def add_parsers(sub: Any) -> None:
    g = sub.add_parser("graph", help="print the merge DAG")
    g.add_argument("recipe", type=Path)
    g.add_argument("--format", choices=["text", "dot"], default="text")
    g.add_argument("--set", action="append", default=[], dest="overrides")
    allow_outside(g)
    common(g)


def cmd_graph(args: argparse.Namespace) -> int:
    from mergebuild.graph import render_dot, render_text
    from mergebuild.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides, args.allow_outside_paths)
    print(render_dot(recipe) if args.format == "dot" else render_text(recipe))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"graph": cmd_graph}
