"""`mergebuild` command line. Imports stay lazy: --help, --dry-run and a cached build never
load torch; the engine is imported only when something must be computed."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from mergebuild import __version__
from mergebuild.cli_sd import SD_HANDLERS, add_parsers
from mergebuild.errors import EXIT_RECIPE, MergebuildError

COMMANDS = (
    "build", "graph", "cache", "demo-models", "lock", "verify", "show", "extract", "methods",
    "explain", "compare", "deps", "makefile",
    *SD_HANDLERS,
)  # fmt: skip


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G)") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="cache directory (default: $MERGEBUILD_CACHE_DIR or the user cache dir)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def _allow_outside(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-outside-paths",
        action="store_true",
        help="let the recipe write outputs outside its own directory",
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="mergebuild",
        description="Build Stable Diffusion checkpoint merges from a YAML recipe, caching every "
        "step. `mergebuild RECIPE` is short for `mergebuild build RECIPE`.",
    )
    top.add_argument("--version", action="version", version=f"mergebuild {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")

    b = sub.add_parser("build", help="build a recipe's outputs (the default command)")
    b.add_argument("recipe", type=Path)
    b.add_argument("outputs", nargs="*", metavar="OUTPUT", help="only these outputs")
    _build_options(b)
    b.add_argument(
        "--update-lock",
        action="store_true",
        help="accept inputs that differ from RECIPE.lock and rewrite it after the build",
    )

    from mergebuild.cli_share import add_share_commands

    add_share_commands(sub, _build_options)

    g = sub.add_parser("graph", help="print the merge DAG")
    g.add_argument("recipe", type=Path)
    g.add_argument("--format", choices=["text", "dot"], default="text")
    g.add_argument("--set", action="append", default=[], dest="overrides")
    _allow_outside(g)
    _common(g)

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
    _common(c)

    d = sub.add_parser("demo-models", help="write small synthetic SD1-shaped models")
    d.add_argument("directory", type=Path)
    d.add_argument(
        "--scale",
        type=float,
        default=1 / 32,
        help="fraction of each large dimension to keep (1 = full size)",
    )
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    _common(d)
    add_parsers(sub, _common)
    from mergebuild.cli_methods import add_parser as add_methods_parser

    add_methods_parser(sub)
    from mergebuild.cli_explain import add_parser as add_explain_parser

    add_explain_parser(sub)
    from mergebuild.cli_compare import add_parser as add_compare_parser

    add_compare_parser(sub)
    from mergebuild.cli_make import add_parsers as add_make_parsers

    add_make_parsers(sub)
    return top


def _build_options(b: argparse.ArgumentParser) -> None:
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
        type=_size,
        default=_size("2G"),
        help="bound on tensor bytes in flight (default 2G); read buffers: min(96M, half)",
    )
    b.add_argument("--device", default="cpu", help="where to compute: cpu (default) or cuda[:N]")
    b.add_argument(
        "--models",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="also look here for models pinned by sha256 (repeatable)",
    )
    _allow_outside(b)
    _common(b)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `mergebuild [OPTIONS] RECIPE` means `mergebuild build [OPTIONS] RECIPE`; an option's
    # value (`--cache-dir c`) may come before the recipe, so `build` goes first
    first = next((a for a in argv if not a.startswith("-")), None)
    if (
        first is not None
        and first not in COMMANDS
        and not any(a in ("-h", "--help", "--version") for a in argv[: argv.index(first)])
    ):
        argv.insert(0, "build")
    args = parser().parse_args(argv)
    warnings.showwarning = _show_warning
    if args.command is None:
        parser().print_help()
        return EXIT_RECIPE
    try:
        return {
            "build": cmd_build,
            "graph": cmd_graph,
            "cache": cmd_cache,
            "demo-models": cmd_demo,
            **share_commands(),
            **SD_HANDLERS,
            "methods": _cmd_methods,
            "explain": _cmd_explain,
            "compare": _cmd_compare,
            "deps": _cmd_make,
            "makefile": _cmd_make,
        }[args.command](args)
    except MergebuildError as e:
        if args.debug:
            raise
        print(f"error: {e}" if "\n" not in str(e) else f"error:\n{e}", file=sys.stderr)
        if getattr(args, "json", False) and not e.json_reported:
            print(json.dumps({"error": str(e), "exit_code": e.exit_code}))
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an unexpected environment: still one line, unless --debug
        if args.debug:
            raise
        print(
            f"error: unexpected {type(e).__name__}: {e} (run with --debug for details)",
            file=sys.stderr,
        )
        return 1


def _cmd_explain(args: argparse.Namespace) -> int:
    from mergebuild.cli_explain import cmd_explain

    return cmd_explain(args)


def _cmd_compare(args: argparse.Namespace) -> int:
    from mergebuild.cli_compare import cmd_compare

    return cmd_compare(args)


def _cmd_make(args: argparse.Namespace) -> int:
    from mergebuild.cli_make import cmd_make

    return cmd_make(args)


def _cmd_methods(args: argparse.Namespace) -> int:
    from mergebuild.cli_methods import cmd_methods

    return cmd_methods(args)


def _show_warning(
    message: Warning | str, category: type[Warning], *_: object, **__: object
) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _store(args: argparse.Namespace) -> Any:
    from mergebuild.cache import CacheStore

    return CacheStore(args.cache_dir)


def share_commands() -> dict[str, Any]:
    from mergebuild.cli_share import COMMANDS as SHARE

    return SHARE


def make_builder(args: argparse.Namespace, outputs: list[str] | None, check_lock: bool) -> Any:
    """Load the recipe and its lock; a Builder set up from the build options."""
    from mergebuild.build import Builder
    from mergebuild.lockfile import locked_inputs, read_lock
    from mergebuild.progress import Progress
    from mergebuild.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides, args.allow_outside_paths)
    human = sys.stderr if args.json else sys.stdout
    return Builder(
        recipe,
        _store(args),
        outputs,
        jobs=max(1, args.jobs),
        max_memory=args.max_memory,
        progress=Progress(enabled=not args.quiet, stream=human),
        device=args.device,
        model_dirs=args.models,
        locked_inputs=locked_inputs(read_lock(recipe)) if check_lock else None,
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
            }
            for n, r in plan.inputs.items()
        },
        "summary": {
            "built" if not args.dry_run else "to_build": built,
            "cached": len(plan.items) - built,
            "seconds": round(seconds, 3),
        },
    }


def cmd_build(args: argparse.Namespace) -> int:
    no_stamp = args.json or args.update_lock or getattr(args, "command", "build") != "build"
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
        plan, seconds = builder.run()
        if not no_stamp:
            from mergebuild.noop import record

            record(args, builder, plan)
        if args.update_lock:
            from mergebuild.cli_share import update_lock

            progress.log(f"wrote {update_lock(builder, plan)[0]}")
    report = build_report(args, builder, plan, seconds)
    built = sum(i.status in ("built", "build") for i in plan.items)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    if args.dry_run:
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


def cmd_graph(args: argparse.Namespace) -> int:
    from mergebuild.graph import render_dot, render_text
    from mergebuild.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides, args.allow_outside_paths)
    print(render_dot(recipe) if args.format == "dot" else render_text(recipe))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    store = _store(args)
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


def cmd_demo(args: argparse.Namespace) -> int:
    from mergebuild.demo import write_demo_models

    for path in write_demo_models(
        args.directory, scale=args.scale, seed=args.seed, dtype=args.dtype
    ):
        print(f"wrote {path} ({path.stat().st_size / 1e6:,.1f} MB)")
    return 0
