"""Stable Diffusion commands: `inspect`, `blocks`, `doctor`.

Kept apart so the model-reading commands can grow without touching the build commands.
Safetensors files are read from their header alone, so `inspect` and `blocks` never load
torch for them.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergebuild.cli.options import common


def add_parsers(sub: Any) -> None:
    """Add the SD subcommands (handlers: COMMANDS) to `sub`."""
    i = sub.add_parser("inspect", help="show a model's architecture, components and dtypes")
    i.add_argument("model", type=Path)
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.add_argument("--keys", action="store_true", help="LoRA: the checkpoint key of each module")
    common(i)
    b = sub.add_parser("blocks", help="list which keys fall in which block-weight (MBW) block")
    b.add_argument("model", type=Path)
    b.add_argument("--keys", action="store_true", help="print every key with its block")
    b.add_argument(
        "--layout",
        choices=["sd1", "sdxl", "flux", "sd3", "sd3_large"],
        help="block layout (default: from the detected architecture)",
    )
    b.add_argument("--json", action="store_true", help="print one JSON object")
    common(b)
    d = sub.add_parser(
        "doctor",
        help="check a model for damage (position_ids, NaN/Inf, fp16 overflow, keys, dtypes)",
    )
    d.add_argument("model", type=Path)
    d.add_argument(
        "--fix",
        type=Path,
        metavar="OUT",
        help="write a repaired copy to OUT (.safetensors): position_ids reset to int64 arange, "
        "everything else byte for byte",
    )
    d.add_argument("--json", action="store_true", help="print one JSON object")
    common(d)


def read_infos(path: Path) -> dict[str, Any]:
    """key → TensorInfo: from the header for safetensors, via the safe loader otherwise."""
    from mergebuild.engine.readers import open_model
    from mergebuild.engine.safetensors_io import read_header
    from mergebuild.errors import BuildError

    if not path.is_file():
        raise BuildError(f"{path}: no such file")
    if path.suffix.lower() in (".safetensors", ".sft"):
        return {k: v[0] for k, v in read_header(path).tensors.items()}
    src = open_model(path)
    try:
        return src.infos()
    finally:
        src.close()


def summary(path: Path) -> dict[str, Any]:
    from mergebuild.sd.arch import component_of, detect, unet_root

    infos = read_infos(path)
    arch = detect(infos)
    root = unet_root(infos)
    comps: Counter[str] = Counter(component_of(k, root) for k in infos)
    return {
        "path": str(path),
        "architecture": arch.as_json(),
        "tensors": len(infos),
        "parameters": sum(math.prod(i.shape) for i in infos.values()),
        "components": dict(sorted(comps.items())),
        "dtypes": dict(sorted(Counter(i.dtype for i in infos.values()).items())),
        "ema_tensors": sum(k.startswith("model_ema.") for k in infos),
        "scaled_fp8_weights": sum(k.endswith(".scale_weight") for k in infos),
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    from mergebuild.lora.inspect import cmd_inspect_lora
    from mergebuild.lora.source import header_is_lora

    if args.model.is_file() and header_is_lora(args.model):
        return cmd_inspect_lora(args.model, args.json, args.keys)
    s = summary(args.model)
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    a = s["architecture"]
    print(f"{s['path']}")
    print(f"  architecture: {a['description']}")
    if a["in_channels"] is not None:
        print(f"  unet input channels: {a['in_channels']}")
    comps = ", ".join(f"{c} ({n})" for c, n in s["components"].items())
    print(f"  components:   {comps}")
    print(f"  tensors:      {s['tensors']:,} ({s['parameters']:,} parameters)")
    print(f"  dtypes:       {', '.join(f'{d} ×{n}' for d, n in s['dtypes'].items())}")
    if s["scaled_fp8_weights"]:
        print(
            f"  scaled fp8:   {s['scaled_fp8_weights']} weights × scale_weight "
            "(merged as fp8 × scale, in float32)"
        )
    if s["ema_tensors"]:
        print(f"  EMA copy:     {s['ema_tensors']} model_ema.* tensors")
    return 0


def cmd_blocks(args: argparse.Namespace) -> int:
    from mergebuild.errors import BuildError
    from mergebuild.sd.arch import component_of, detect, unet_root
    from mergebuild.sd.blocks import LAYOUT_NAMES, LAYOUTS, block_of

    infos = read_infos(args.model)
    arch = detect(infos)
    layout = args.layout or arch.block_layout
    if layout is None:
        raise BuildError(
            f"{args.model}: {arch.describe()} has no block layout; pass --layout "
            "sd1|sdxl|flux|sd3|sd3_large"
        )
    root = unet_root(infos)
    keys = {k: block_of(k, layout, root) for k in sorted(infos)}
    if args.json:
        print(
            json.dumps({"architecture": arch.as_json(), "layout": layout, "keys": keys}, indent=1)
        )
        return 0
    if args.keys:
        for k, blk in keys.items():
            print(f"{blk}\t{k}")
        return 0
    print(f"{args.model}: {arch.describe()}, {LAYOUT_NAMES[layout]} block layout")
    noun = "transformer" if layout in ("flux", "sd3", "sd3_large") else "UNet"
    for blk in LAYOUTS[layout]:
        members = [k for k, b in keys.items() if b == blk]
        unet = [k for k in members if component_of(k, root) == "unet"]
        params = sum(math.prod(infos[k].shape) for k in members)
        first = unet[0].removeprefix("model.diffusion_model.") if unet else "-"
        extra = f" + {len(members) - len(unet)} other" if len(members) > len(unet) else ""
        print(f"  {blk:<6} {len(unet):>4} {noun} tensors{extra:<14} {params:>14,} params  {first}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Exit 0: healthy (warnings allowed) or every damage repaired by --fix; 1: damage remains."""
    from mergebuild.errors import BuildError
    from mergebuild.sd.doctor import examine, findings_json, write_fixed

    if not args.model.is_file():
        raise BuildError(f"{args.model}: no such file")
    fix = args.fix
    if fix is not None:
        if fix.suffix.lower() != ".safetensors":
            raise BuildError(f"--fix {fix}: the repaired copy is written as .safetensors")
        if fix.exists() and fix.resolve() == args.model.resolve():
            raise BuildError(f"--fix {fix}: writes a copy; choose a path other than the input")
    arch, n, findings = examine(args.model)
    changes = write_fixed(args.model, fix) if fix is not None else []
    errors = [f for f in findings if f.severity == "error"]
    remaining = [f for f in errors if not (fix is not None and f.fixable)]
    if args.json:
        print(
            json.dumps(
                {
                    "path": str(args.model),
                    "architecture": arch.as_json(),
                    "tensors": n,
                    "findings": findings_json(findings),
                    "fixed": {"path": str(fix), "changes": changes} if fix else None,
                    "healthy": not errors,
                },
                indent=1,
            )
        )
        return 1 if remaining else 0
    print(f"{args.model}: {arch.describe()}, {n:,} tensors checked")
    for f in findings:
        hint = "  [fix: --fix OUT]" if f.fixable and fix is None else ""
        print(f"  {f.severity:<8} {f.check:<16} {f.message}{hint}")
    if not findings:
        print("  no problems found")
    else:
        warns = len(findings) - len(errors)
        print(f"{len(errors)} error(s), {warns} warning(s)")
    if fix is not None:
        print(f"wrote {fix}: " + ("; ".join(changes) if changes else "no repair needed (copy)"))
        print("  every other tensor and the metadata are unchanged")
        for f in remaining:
            print(f"  not repaired: {f.check} ({f.message})")
    return 1 if remaining else 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "inspect": cmd_inspect,
    "blocks": cmd_blocks,
    "doctor": cmd_doctor,
}
