"""`mergebuild push RECIPE`, `pull RECIPE`, `cache ls --remote` and the push after a build.

Explicit push and pull exist to talk to the remote, so for them a remote that cannot be used is
an error (exit != 0), never a warning.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from mergebuild.errors import BuildError


def _entries(plan: Any) -> list[tuple[str, str]]:
    """(name, key) of every item of the plan that has a cache object."""
    return [(i.name, i.key) for i in plan.items if i.kind == "output" or i.stored]


def push_plan(builder: Any, plan: Any) -> tuple[int, int]:
    uploaded, there = builder.remote.push(_entries(plan))
    if not builder.remote.down:
        builder.progress.log(
            f"remote cache {builder.remote.settings.url}: {uploaded} pushed, {there} already there"
        )
    return uploaded, there


def _session_builder(args: argparse.Namespace) -> Any:
    from mergebuild.cli.options import make_builder

    builder = make_builder(args, args.outputs or None, check_lock=True)
    if builder.remote is None:
        raise BuildError(
            "no remote cache configured: give --remote URL, set $MERGEBUILD_REMOTE or "
            "cache.remote in the recipe"
        )
    session = builder.remote
    session.settings = dataclasses.replace(session.settings, required=True)
    builder.remote = None  # plan the local state only; the commands talk to the remote
    return builder, session


def cmd_push(args: argparse.Namespace) -> int:
    builder, session = _session_builder(args)
    plan = builder.plan()
    missing = [i.name for i in plan.items if i.status == "build"]
    uploaded, there = session.push(_entries(plan))
    print(f"remote cache {session.settings.url}: {uploaded} pushed, {there} already there")
    if missing:
        print(f"not in the local cache (build first): {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    builder, session = _session_builder(args)
    plan = builder.plan()
    pulled = local = absent = 0
    for name, key in _entries(plan):
        if builder.store.has(key):
            local += 1
        elif session.lookup(name, key) is not None:
            pulled += 1
        else:
            absent += 1
    print(
        f"remote cache {session.settings.url}: {pulled} pulled, {local} already local, "
        f"{absent} not on the remote"
    )
    return 0 if not session.bad else 1


def cmd_ls_remote(url: str | None, as_json: bool) -> int:
    import json

    from mergebuild.remote.config import ENV_VAR
    from mergebuild.remote.store import RemoteCache, RemoteUnavailable

    url = url or os.environ.get(ENV_VAR)
    if not url:
        raise BuildError(f"cache ls --remote: give a URL or set ${ENV_VAR}")
    remote = RemoteCache(url)
    try:
        remote.probe()
        entries = list(remote.entries())
    except RemoteUnavailable as e:
        raise BuildError(f"remote cache {url} cannot be used: {e}") from None
    total = sum(int(info["size"]) for _, info in entries)
    if as_json:
        out = {"remote": url, "bytes": total, "objects": [info for _, info in entries]}
        print(json.dumps(out, indent=1))
        return 0
    for key, info in entries:
        print(
            f"{key} {info.get('kind', '?'):<6} {info.get('name', '?'):<24} "
            f"{info['size'] / 1e6:,.1f} MB"
        )
    print(f"{len(entries)} objects, {total / 1e6:,.1f} MB on {url}")
    return 0
