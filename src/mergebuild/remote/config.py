"""Which remote a command uses: `--remote URL` over `$MERGEBUILD_REMOTE` over the recipe's
`cache: {remote: URL, push: bool, remote_options: {...}}`."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any

from mergebuild.errors import BuildError

ENV_VAR = "MERGEBUILD_REMOTE"


@dataclass(frozen=True)
class Settings:
    url: str
    options: dict[str, Any] = field(default_factory=dict)
    push: bool = False
    required: bool = False


def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("remote cache")
    g.add_argument(
        "--remote",
        metavar="URL",
        help=f"remote cache: s3://bucket/prefix, a directory, https://… "
        f"(default: ${ENV_VAR} or the recipe's cache.remote)",
    )
    g.add_argument("--push", action="store_true", help="upload new cache entries after the build")
    g.add_argument(
        "--remote-required",
        action="store_true",
        help="a remote that cannot be used is an error, not a warning",
    )


def settings(args: argparse.Namespace, recipe_cache: dict[str, Any] | None) -> Settings | None:
    """None: no remote configured anywhere (the usual, local-only case)."""
    section = recipe_cache or {}
    url = getattr(args, "remote", None) or os.environ.get(ENV_VAR) or section.get("remote")
    required = bool(getattr(args, "remote_required", False))
    if not url:
        if required:
            raise BuildError(
                f"--remote-required but no remote cache is configured (--remote URL, "
                f"${ENV_VAR} or cache.remote in the recipe)"
            )
        return None
    push = bool(getattr(args, "push", False) or section.get("push"))
    return Settings(str(url), dict(section.get("remote_options") or {}), push, required)
