"""The `mergebuild` parser, dispatch and error handling; the commands live in their groups.

Every group module (build, share, graph, cache, demo, sd, methods, explain, compare, make)
has `add_parsers` and `COMMANDS`; this module only assembles them, so no group imports another
through here.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from mergebuild import __version__
from mergebuild.cli import (
    build,
    cache,
    compare,
    demo,
    explain,
    graph,
    make,
    methods,
    remote,
    sd,
    share,
)
from mergebuild.cli import fetch as fetch_
from mergebuild.errors import EXIT_RECIPE, MergebuildError

# in this order in `mergebuild --help`
GROUPS = (build, share, fetch_, remote, graph, cache, demo, sd, methods, explain, compare, make)
HANDLERS = {name: cmd for group in GROUPS for name, cmd in group.COMMANDS.items()}
COMMANDS = tuple(HANDLERS)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="mergebuild",
        description="Build Stable Diffusion checkpoint merges from a YAML recipe, caching every "
        "step. `mergebuild RECIPE` is short for `mergebuild build RECIPE`.",
    )
    top.add_argument("--version", action="version", version=f"mergebuild {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS:
        group.add_parsers(sub)
    return top


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
        return HANDLERS[args.command](args)
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


def _show_warning(
    message: Warning | str, category: type[Warning], *_: object, **__: object
) -> None:
    print(f"warning: {message}", file=sys.stderr)
