"""`mergebuild methods [NAME]`: the merge method catalogue, from the methods' own declarations.

Imports only the registry (pydantic specs, no torch), so listing methods is instant.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from mergebuild.errors import EXIT_RECIPE, MergebuildError, did_you_mean


class UnknownMethod(MergebuildError):
    exit_code = EXIT_RECIPE


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("methods", help="list merge methods, or describe one")
    p.add_argument("name", nargs="?", metavar="NAME", help="describe this method")
    p.add_argument(
        "--markdown", action="store_true", help="the catalogue as README.md's Markdown table"
    )
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def inputs_text(m: Any) -> str:
    if m.inputs_form == "base_models":
        return f"{m.base_name} + {m.models_name} (≥{m.min_models})"
    if m.inputs_form == "variadic":
        return f"{m.models_name} (≥{m.min_models})"
    return ", ".join(m.slots)


def rows() -> list[tuple[str, str, str, str, str]]:
    """(name, formula, inputs, random, streaming) per method, in registry order."""
    from mergebuild.engine.methods import REGISTRY

    return [
        (m.name, m.formula, inputs_text(m), "yes" if m.random else "no", m.streaming)
        for m in REGISTRY.values()
    ]


def markdown() -> str:
    """README.md's methods table (a test keeps the README equal to this)."""
    lines = ["| method | formula | inputs | random | streaming |", "|---|---|---|---|---|"]
    for name, formula, inputs, random, streaming in rows():
        cells = [f"`{name}`", formula.replace("|", "\\|"), inputs, random, streaming]
        lines.append("| " + " | ".join(cells).replace("whole_tensor", "whole tensor") + " |")
    return "\n".join(lines)


def cmd_methods(args: argparse.Namespace) -> int:
    from mergebuild.engine.methods import REGISTRY

    if args.markdown:
        print(markdown())
        return 0
    if args.name is None:
        table = [("METHOD", "FORMULA", "INPUTS", "RANDOM", "STREAMING"), *rows()]
        widths = [max(len(r[i]) for r in table) for i in range(4)]
        for r in table:
            print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)), r[4])
        print("\n`mergebuild methods NAME` describes one, with an example.")
        return 0
    m = REGISTRY.get(args.name)
    if m is None:
        raise UnknownMethod(
            f"unknown method '{args.name}'{did_you_mean(args.name, REGISTRY)} "
            f"(available: {', '.join(REGISTRY)})"
        )
    print(f"{m.signature()}\n")
    print(f"  formula:   {m.formula}")
    print(f"  inputs:    {inputs_text(m)}")
    print(f"  streaming: {m.streaming}")
    print(f"  random:    {'yes (seed: int, default 0)' if m.random else 'no'}")
    print(f"  version:   {m.version}")
    if m.block_params:
        print(f"  block weights allowed for: {', '.join(m.block_params)}")
    print(f"\n{m.description}\n\nExample (under `merges:`):\n")
    print("\n".join(f"  {line}" for line in m.example.splitlines()))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"methods": cmd_methods}
