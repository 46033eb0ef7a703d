"""`mergebuild demo-models DIR`: small synthetic SD1-shaped models to try recipes on."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergebuild.cli.options import common


def add_parsers(sub: Any) -> None:
    d = sub.add_parser(
        "demo-models", help="write small synthetic SD1-shaped (or Flux / SD3) models"
    )
    d.add_argument("directory", type=Path)
    d.add_argument(
        "--scale",
        type=float,
        default=1 / 32,
        help="fraction of each large dimension to keep (1 = full size)",
    )
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--dtype", choices=["fp16", "bf16", "fp32"], help="default: fp16 (SD1), bf16 (Flux, SD3)"
    )
    d.add_argument(
        "--arch",
        choices=["sd1", "flux", "sd3"],
        default="sd1",
        help="sd1: the example recipes' models; flux: all-in-one, transformer-only and bare-key "
        "Flux files; sd3: SD3 medium all-in-one files",
    )
    common(d)


def cmd_demo(args: argparse.Namespace) -> int:
    from mergebuild.demo import write_demo_models, write_dit_models

    if args.arch == "sd1":
        paths = write_demo_models(
            args.directory, scale=args.scale, seed=args.seed, dtype=args.dtype or "fp16"
        )
    else:
        paths = write_dit_models(
            args.directory, args.arch, args.scale, args.seed, args.dtype or "bf16"
        )
    for path in paths:
        print(f"wrote {path} ({path.stat().st_size / 1e6:,.1f} MB)")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"demo-models": cmd_demo}
