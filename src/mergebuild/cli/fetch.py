"""`mergebuild fetch RECIPE`: download every pinned model that is not present; build nothing.

For a machine that will build later (or offline): after it, the build needs no network.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergebuild.cli.options import allow_outside, common, models_option, open_store


def add_parsers(sub: Any) -> None:
    f = sub.add_parser(
        "fetch", help="download the recipe's pinned models (urls/hf) that are not present"
    )
    f.add_argument("recipe", type=Path)
    f.add_argument("-n", "--dry-run", action="store_true", help="say what would be downloaded")
    f.add_argument("--json", action="store_true", help="print one JSON report on stdout")
    f.add_argument("-q", "--quiet", action="store_true", help="no progress or summary")
    models_option(f)
    allow_outside(f)
    common(f)


def cmd_fetch(args: argparse.Namespace) -> int:
    from mergebuild.fetch.missing import absent, downloadable, fetch_missing
    from mergebuild.fetch.sources import describe
    from mergebuild.locate import resolve_model, search_dirs
    from mergebuild.progress import Progress
    from mergebuild.recipe import load_recipe

    recipe = load_recipe(args.recipe, [], args.allow_outside_paths)
    store = open_store(args)
    human = sys.stderr if args.json else sys.stdout
    progress = Progress(enabled=not args.quiet, stream=human)
    names = sorted(n for n, m in recipe.models.items() if downloadable(m))
    if args.dry_run:
        todo = absent(recipe, names, store, args.models)
    else:
        todo = fetch_missing(recipe, names, store, args.models, progress)
    dirs = search_dirs(recipe, args.models)
    report: dict[str, dict[str, Any]] = {}
    for name in names:
        m = recipe.models[name]
        if args.dry_run and name in todo:
            report[name] = {"status": "download", "source": describe(m.urls, m.hf)}
            continue
        found = resolve_model(m, store.hashes, dirs, None, store.root)
        status = "downloaded" if name in todo else "present"
        report[name] = {"status": status, "path": str(found.path), "sha256": found.hashes.sha256}
    if args.json:
        print(json.dumps({"recipe": str(recipe.path), "models": report}, indent=1))
        return 0
    for name, r in report.items():
        progress.log(f"{r['status']:<10} {name:<28} {r.get('path') or r['source']}")
    if not names:
        progress.log("no model in this recipe has urls or hf: nothing to fetch")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"fetch": cmd_fetch}
