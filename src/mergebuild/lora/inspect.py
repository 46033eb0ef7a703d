"""`mergebuild inspect LORA`: format, algorithm, base architecture, ranks, alpha, the blocks and
components it touches, and (`--keys`) where each module lands. Header only, no torch: the alpha
scalars are read straight from their bytes."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from mergebuild.engine.safetensors_io import Header, read_header
from mergebuild.errors import BuildError
from mergebuild.lora.formats import LoraFormatError, parse
from mergebuild.lora.keymap import target
from mergebuild.lora.peft import CONFIG
from mergebuild.lora.peft import alphas as config_alphas
from mergebuild.sd.arch import FAMILY_NAMES, component_of

SHOWN_METADATA = (
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
)
_NP = {"F16": np.float16, "F32": np.float32, "F64": np.float64}


def _scalar(path: Path, header: Header, key: str) -> float | None:
    info, begin, end = header.tensors[key]
    if end - begin > 8 or info.dtype not in (*_NP, "BF16"):
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        raw = os.pread(fd, end - begin, header.data_start + begin)
    finally:
        os.close(fd)
    if info.dtype == "BF16":  # the high half of a float32
        return float((np.frombuffer(raw[:2], dtype="<u2").astype("<u4") << 16).view("<f4")[0])
    return float(np.frombuffer(raw, dtype=_NP[info.dtype])[0])


def report(path: Path) -> dict[str, Any]:
    header = read_header(path)
    try:
        info = parse({k: v[0] for k, v in header.tensors.items()}, header.metadata)
    except LoraFormatError as e:
        raise BuildError(f"{path}: not a LoRA mergebuild can read: {e}") from None
    family = "sd1" if info.family == "sd1/sd2" else info.family
    layout = "sdxl" if family == "sdxl" else "sd1"
    from mergebuild.sd.blocks import block_of

    algos: Counter[str] = Counter()
    ranks: Counter[int] = Counter()
    alphas: Counter[float] = Counter()
    blocks: Counter[str] = Counter()
    comps: Counter[str] = Counter()
    keys: dict[str, Any] = {}
    unmapped = []
    cfg_alphas, note = config_alphas(path, info)  # a PEFT LoRA's adapter_config.json
    for name, m in sorted(info.modules.items()):
        algos[m.algorithm + (" (tucker)" if m.tucker else "") + (" + dora" if m.dora else "")] += 1
        if m.rank is not None:
            ranks[m.rank] += 1
        alpha = _scalar(path, header, m.parts["alpha"]) if "alpha" in m.parts else None
        alpha = cfg_alphas.get(name) if alpha is None else alpha
        alphas[alpha if alpha is not None else m.rank or 0] += 1
        t = target(name, family)
        if t is None:
            unmapped.append(name)
            continue
        comp = component_of(t.key)
        comps[comp] += 1
        if comp == "unet":
            blocks[block_of(t.key, layout)] += 1
        keys[name] = {"key": t.key, **({"part": f"{t.part[0] + 1}/{t.part[1]}"} if t.part else {})}
    return {
        "path": str(path),
        "lora": True,
        "format": info.format,
        "base_architecture": info.family,
        "base_description": " or ".join(FAMILY_NAMES[f] for f in info.families()),
        "modules": len(info.modules),
        "algorithms": dict(sorted(algos.items())),
        "ranks": {str(r): n for r, n in sorted(ranks.items())},
        "alphas": {f"{a:g}": n for a, n in sorted(alphas.items())},
        "components": dict(sorted(comps.items())),
        "blocks": dict(sorted(blocks.items())),
        "unmapped": unmapped,
        **({"alpha_from": CONFIG} if cfg_alphas else {}),
        **({"warning": note} if note else {}),
        "metadata": {k: header.metadata[k][:200] for k in SHOWN_METADATA if k in header.metadata},
        "keys": keys,
    }


def cmd_inspect_lora(path: Path, as_json: bool, show_keys: bool) -> int:
    r = report(path)
    if not show_keys and as_json:
        r = {k: v for k, v in r.items() if k != "keys"}
    if as_json:
        print(json.dumps(r, indent=1))
        return 0
    print(r["path"])
    print(f"  LoRA:         {r['format']} format, {r['modules']} modules")
    print(f"  base:         {r['base_description']}")
    print(f"  algorithm:    {', '.join(f'{a} ×{n}' for a, n in r['algorithms'].items())}")
    print(f"  rank:         {', '.join(f'{k} ×{n}' for k, n in r['ranks'].items()) or '—'}")
    print(f"  alpha:        {', '.join(f'{k} ×{n}' for k, n in r['alphas'].items())}")
    print(f"  components:   {', '.join(f'{c} ({n})' for c, n in r['components'].items())}")
    if r["blocks"]:
        print(f"  blocks:       {', '.join(f'{b} ({n})' for b, n in r['blocks'].items())}")
    if r["unmapped"]:
        more = " …" if len(r["unmapped"]) > 5 else ""
        print(f"  unmapped:     {len(r['unmapped'])}: {', '.join(r['unmapped'][:5])}{more}")
    if "alpha_from" in r:
        print(f"  alpha from:   {r['alpha_from']}")
    if "warning" in r:
        print(f"  warning:      {r['warning']}")
    for k, v in r["metadata"].items():
        print(f"  {k}: {v}")
    if show_keys:
        for name, t in r["keys"].items():
            part = f" (rows {t['part']})" if "part" in t else ""
            print(f"  {name} → {t['key']}{part}")
    return 0
