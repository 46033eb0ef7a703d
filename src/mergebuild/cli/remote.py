"""`mergebuild push RECIPE` / `pull RECIPE`: share a recipe's cache entries through a remote.

The work lives in remote/commands.py, imported only when one of these runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergebuild.cli.options import build_options


def add_parsers(sub: Any) -> None:
    for name, text in (
        ("push", "upload a recipe's cache entries to the remote cache"),
        ("pull", "download a recipe's cache entries from the remote cache (no build)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("recipe", type=Path)
        p.add_argument("outputs", nargs="*", metavar="OUTPUT", help="only these outputs")
        build_options(p)


def _push(args: argparse.Namespace) -> int:
    from mergebuild.remote.commands import cmd_push

    return cmd_push(args)


def _pull(args: argparse.Namespace) -> int:
    from mergebuild.remote.commands import cmd_pull

    return cmd_pull(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"push": _push, "pull": _pull}
