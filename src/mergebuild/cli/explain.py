"""`mergebuild explain RECIPE [NODE]`: each merge node's linear form over the input models.

Reads only the recipe (no torch, no model file), so it works before the models are downloaded.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "explain", help="show each merge as a linear combination of the input models"
    )
    p.add_argument("recipe", type=Path)
    p.add_argument("node", nargs="?", metavar="NODE", help="explain only this merge node")
    p.add_argument("--json", action="store_true", help="print one JSON report on stdout")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME.PARAM=VALUE",
        dest="overrides",
        help="override a merge parameter",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def cmd_explain(args: argparse.Namespace) -> int:
    from mergebuild.explain import explain, text
    from mergebuild.recipe import load_recipe

    # nothing is written: an output outside the recipe's directory is no concern here
    recipe = load_recipe(args.recipe, args.overrides, allow_outside_paths=True)
    reports = explain(recipe, args.node)
    if args.json:
        print(json.dumps({"nodes": reports}, indent=2, ensure_ascii=False))
    else:
        print(text(reports))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"explain": cmd_explain}
