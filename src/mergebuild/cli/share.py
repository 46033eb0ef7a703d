"""Commands for sharing recipes reproducibly: lock, verify, show, extract.

The flow: the author builds, runs `mergebuild lock` and publishes recipe + lock; anyone runs
`mergebuild verify` on their own copies of the inputs and gets exit 0 only if every output is
bit-identical to the author's. `show` and `extract` read the provenance a file carries.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergebuild.cli.build import cmd_build, output_hashes, update_lock
from mergebuild.cli.options import build_options, make_builder
from mergebuild.errors import BuildError, MergebuildError


class VerifyFailed(MergebuildError):
    """Outputs were built but differ from the lock file."""


def add_parsers(sub: Any) -> None:
    lk = sub.add_parser("lock", help="build, then write RECIPE.lock (hashes of inputs/outputs)")
    lk.add_argument("recipe", type=Path)
    build_options(lk)
    v = sub.add_parser(
        "verify", help="rebuild what is not cached and check outputs against RECIPE.lock"
    )
    v.add_argument("recipe", type=Path)
    build_options(v)
    s = sub.add_parser("show", help="hashes, architecture, dtypes and provenance of a model")
    s.add_argument("model", type=Path)
    s.add_argument("--json", action="store_true")
    s.add_argument("--cache-dir", type=Path, help="where hashes are memoized")
    s.add_argument("--debug", action="store_true")
    e = sub.add_parser("extract", help="print a runnable recipe rebuilt from a model's metadata")
    e.add_argument("model", type=Path)
    e.add_argument("-o", "--output", type=Path, help="write the recipe here instead of stdout")
    e.add_argument(
        "--sources",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="a recipe or lock file: inputs with a sha256 listed there get its urls/hf "
        "(repeatable)",
    )
    e.add_argument("--debug", action="store_true")


def _dry_run(args: argparse.Namespace, lock_is_rewritten: bool) -> int:
    """`lock -n` / `verify -n`: the build plan, as `mergebuild RECIPE -n` shows it; no lock
    is read for checking when it is about to be rewritten, and nothing is built or written."""
    args.outputs, args.update_lock = None, lock_is_rewritten
    return cmd_build(args)


def cmd_lock(args: argparse.Namespace) -> int:
    if args.dry_run:
        return _dry_run(args, lock_is_rewritten=True)
    builder = make_builder(args, None, check_lock=False)
    plan, _ = builder.run()
    path, outputs = update_lock(builder, plan)
    if args.json:
        print(json.dumps({"lock": str(path), "outputs": outputs}, indent=1))
    elif not args.quiet:
        for name, (sha, size) in outputs.items():
            print(f"{name:<28} sha256 {sha}  {size:,} bytes")
        print(f"wrote {path}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from mergebuild.lockfile import lock_path, read_lock

    if args.dry_run:
        return _dry_run(args, lock_is_rewritten=False)
    builder = make_builder(args, None, check_lock=True)
    lock = read_lock(builder.recipe)
    if lock is None:
        raise BuildError(f"no lock file {lock_path(builder.recipe)}: `mergebuild lock` writes one")
    plan, _ = builder.run()
    got = output_hashes(builder, plan)
    results = []
    for name, entry in sorted((lock.get("outputs") or {}).items()):
        want = entry.get("sha256") if isinstance(entry, dict) else None
        have = got.get(name, (None, None))[0]
        results.append({"output": name, "expected": want, "actual": have, "ok": want == have})
    for name in sorted(set(got) - set(lock.get("outputs") or {})):
        results.append({"output": name, "expected": None, "actual": got[name][0], "ok": False})
    problems = _recipe_drift(builder, plan, lock)
    ok = all(r["ok"] for r in results) and not problems
    failure = None
    if not ok:
        failure = VerifyFailed(
            f"{sum(not r['ok'] for r in results)} of {len(results)} outputs differ from "
            f"{builder.recipe.path.with_suffix('.lock').name}"
            + (f"; the recipe changed since it was locked ({len(problems)})" if problems else "")
        )
    if args.json:  # one JSON document on stdout, the failure included
        doc = {"ok": ok, "outputs": results, "recipe_changes": problems}
        if failure is not None:
            doc |= {"error": str(failure), "exit_code": failure.exit_code}
            failure.json_reported = True
        print(json.dumps(doc, indent=1))
    else:
        for r in results:
            if r["ok"]:
                print(f"ok        {r['output']:<28} sha256 {r['actual']}")
            elif r["expected"] is None:
                print(f"NOT LOCKED {r['output']:<27} sha256 {r['actual']}")
            else:
                print(
                    f"MISMATCH  {r['output']:<28} expected {r['expected']}\n"
                    f"          {'':<28} actual   {r['actual']}"
                )
        for p in problems:
            print(f"changed   {p}")
    if failure is not None:
        if lock.get("mergebuild_version") != _version():
            print(
                f"note: the lock was written by mergebuild {lock.get('mergebuild_version')}, "
                f"this is {_version()}; output metadata records the version",
                file=sys.stderr,
            )
        raise failure
    return 0


def _version() -> str:
    from mergebuild import __version__

    return __version__


def _recipe_drift(builder: Any, plan: Any, lock: dict[str, Any]) -> list[str]:
    """Nodes whose canonical form differs from the lock (named, for the user)."""
    locked = lock.get("nodes") or {}
    used = {n for n in builder.recipe.nodes if n in plan.keys}  # what the outputs depend on
    out = []
    for name in sorted(set(locked) | used):
        if name not in used:
            out.append(f"node '{name}' was removed")
        elif name not in locked:
            out.append(f"node '{name}' is new")
        elif isinstance(locked[name], dict) and locked[name].get("key") != plan.keys.get(name):
            out.append(f"node '{name}' differs (method, parameters, dtype or inputs)")
    return out


# -- show / extract (foreign provenance is handled in extract.py) --------------------------------


def describe(path: Path, memo_dir: Path | None) -> dict[str, Any]:
    """`inspect`'s summary plus the three hashes and the provenance the file carries."""
    from mergebuild.cache import CacheStore
    from mergebuild.cli.sd import summary
    from mergebuild.provenance import METADATA_KEY, read_metadata_values

    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise BuildError(f"{path}: `show` reads safetensors files (convert a .ckpt first)")
    s = summary(path)
    hashes, _ = CacheStore(memo_dir).hashes.hashes(path)
    meta = read_metadata_values(path)
    return {
        "path": str(path),
        "architecture": s["architecture"]["description"],
        "tensors": s["tensors"],
        "parameters": s["parameters"],
        "dtypes": s["dtypes"],
        "size": hashes.size,
        "sha256": hashes.sha256,
        "autov2": hashes.autov2,
        "legacy_hash": hashes.legacy,
        "provenance": meta.get(METADATA_KEY),
        "sd_merge_recipe": meta.get("sd_merge_recipe"),
    }


def cmd_show(args: argparse.Namespace) -> int:
    from mergebuild.extract import one_line, provenance_tree

    info = describe(args.model, args.cache_dir)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{info['path']}")
    print(f"  architecture  {info['architecture']}")
    print(f"  tensors       {info['tensors']:,}")
    print(f"  dtypes        {', '.join(f'{k}×{v}' for k, v in info['dtypes'].items())}")
    print(f"  size          {info['size']:,} bytes")
    print(f"  sha256        {info['sha256']}")
    print(f"  AutoV2        {info['autov2']}")
    print(f"  legacy hash   {info['legacy_hash']}")
    if isinstance(info["provenance"], dict):
        print("  provenance (mergebuild):")
        for line in provenance_tree(info["provenance"], 2):
            print(line)
    elif info["provenance"] is not None:
        print("  provenance (mergebuild): not well-formed bounded JSON; ignored")
    elif info["sd_merge_recipe"]:
        text = json.dumps(info["sd_merge_recipe"], ensure_ascii=False)
        print(f"  provenance (web UI): {one_line(text, 1000)}")
    else:
        print("  provenance    none recorded")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from mergebuild.atomic import write_bytes
    from mergebuild.extract import check_recipe_target, extract
    from mergebuild.provenance import METADATA_KEY, read_metadata_values

    if not args.model.is_file():
        raise BuildError(f"no such file: {args.model}")
    prov = read_metadata_values(args.model).get(METADATA_KEY)
    if not isinstance(prov, dict) or prov.get("format") != 2:
        raise BuildError(
            f"{args.model} carries no mergebuild provenance (format 2): it was not built by "
            "this version of mergebuild"
        )
    try:
        result = extract(prov)
    except BuildError as e:
        raise BuildError(f"{args.model}: {e}") from None
    for src in args.sources:  # downloads are not in the provenance: fetch/catalogue.py
        from mergebuild.fetch.catalogue import attach_sources, read_sources

        known, skipped = read_sources(src)
        result.warnings += skipped
        named = attach_sources(result.doc, known)
        if named:
            result.comments.append(f"download sources from {src.name}: {', '.join(named)}")
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    text = result.text()
    if args.output:
        check_recipe_target(args.output, args.model)
        write_bytes(args.output, text.encode())
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "lock": cmd_lock,
    "verify": cmd_verify,
    "show": cmd_show,
    "extract": cmd_extract,
}
