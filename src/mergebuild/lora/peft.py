"""The alpha of a PEFT/diffusers LoRA: its safetensors has no `alpha` tensors, PEFT keeps them in
the `adapter_config.json` it writes next to the weights (lora_alpha, r, alpha_pattern,
rank_pattern, use_rslora). Without that file alpha = rank (scale 1) is assumed, and said so.

The config changes the ΔW, so it is part of the LoRA's cache identity (`input_key`). Pattern
keys are matched as PEFT matches the names it writes — the whole module path or a suffix after a
`.` — but literally: a pattern from a downloaded file is never run as a regular expression.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergebuild.errors import BuildError
from mergebuild.lora.formats import KOHYA_PREFIXES, LoraInfo, Module

CONFIG = "adapter_config.json"
CONFIG_CAP = 1 << 20
SUFFIXES = (".lora_A.weight", ".lora.down.weight", ".lora_down.weight")
PREFIXES = ("base_model.model.",)


@dataclass(frozen=True)
class AdapterConfig:
    path: Path
    alpha: float
    rslora: bool = False
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    raw: bytes = b""


def config_path(lora: Path) -> Path:
    return lora.parent / CONFIG


def _number(v: Any, what: str, path: Path) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise BuildError(f"{path}: '{what}' must be a positive number, not {json.dumps(v)[:40]}")
    return float(v)


def read_config(lora: Path) -> AdapterConfig | None:
    """The adapter config next to `lora`, or None when there is none."""
    from mergebuild.textfile import TextFileError, read_capped

    path = config_path(lora)
    if not path.exists():
        return None
    try:
        raw = read_capped(path, CONFIG_CAP, "adapter config")
        data = json.loads(raw.decode("utf-8"))
    except (OSError, TextFileError) as e:
        raise BuildError(f"{path}: cannot read it: {e}") from None
    except ValueError as e:
        raise BuildError(f"{path}: not a JSON adapter config: {e}") from None
    if not isinstance(data, dict) or "lora_alpha" not in data:
        raise BuildError(f"{path}: no 'lora_alpha' (a PEFT adapter config has one)")
    pattern = data.get("alpha_pattern") or {}
    if not isinstance(pattern, dict):
        raise BuildError(f"{path}: 'alpha_pattern' must be a mapping of module names to numbers")
    rslora = data.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise BuildError(f"{path}: 'use_rslora' must be true or false")
    return AdapterConfig(
        path,
        _number(data["lora_alpha"], "lora_alpha", path),
        rslora,
        {str(k): _number(v, f"alpha_pattern.{k}", path) for k, v in pattern.items()},
        raw,
    )


def peft_name(m: Module) -> str:
    """The module path PEFT's patterns are matched against (no prefix, no factor suffix)."""
    name = m.parts.get("down", "")
    for s in SUFFIXES:
        name = name.removesuffix(s)
    for p in PREFIXES:
        name = name.removeprefix(p)
    return name


def _matches(key: str, name: str) -> bool:
    return name == key or name.endswith("." + key)


def module_alpha(cfg: AdapterConfig, m: Module) -> float:
    """alpha such that alpha/rank is PEFT's scale: lora_alpha/r, or lora_alpha/√r (rsLoRA);
    r is the module's real rank (its tensors), which rank_pattern only describes."""
    name = peft_name(m)
    alpha = next((a for k, a in cfg.alpha_pattern.items() if _matches(k, name)), cfg.alpha)
    rank = m.rank or 1
    return alpha * math.sqrt(rank) if cfg.rslora else alpha


def needs_alpha(info: LoraInfo) -> list[str]:
    """PEFT-named plain LoRA modules without an alpha tensor."""
    return sorted(
        n
        for n, m in info.modules.items()
        if "alpha" not in m.parts
        and m.algorithm in ("lora", "locon")
        and "down" in m.parts
        and not m.parts["down"].startswith(KOHYA_PREFIXES)
    )


def alphas(path: Path, info: LoraInfo) -> tuple[dict[str, float], str | None]:
    """module → alpha from the adapter config, and the warning for a LoRA that needs one and
    has none (alpha = rank assumed)."""
    missing = needs_alpha(info)
    if not missing:
        return {}, None
    cfg = read_config(path)
    if cfg is None:
        return {}, (
            f"LoRA {path.name}: {len(missing)} PEFT modules have no alpha and there is no "
            f"{CONFIG} next to it: alpha = rank (scale 1) assumed; put the {CONFIG} PEFT "
            "saved with it next to the file to use its lora_alpha"
        )
    return {n: module_alpha(cfg, info.modules[n]) for n in missing}, None


def input_key(path: Path, file_key: str) -> str:
    """A model's cache identity: its bytes' hash, and for a PEFT LoRA that takes its alpha from
    an adapter config, that config's bytes too (editing it must rebuild)."""
    if not config_path(path).is_file():
        return file_key
    from mergebuild.engine.safetensors_io import read_header
    from mergebuild.graph import xxh3_hex
    from mergebuild.lora.formats import LoraFormatError, is_lora, parse

    try:
        header = read_header(path)
        if not is_lora(header.tensors):
            return file_key
        info = parse({k: v[0] for k, v in header.tensors.items()}, header.metadata)
        if not needs_alpha(info):
            return file_key
        cfg = read_config(path)
    except (OSError, ValueError, LoraFormatError, BuildError):
        return file_key  # the build reports an unreadable file with its reason
    if cfg is None:
        return file_key
    return xxh3_hex(f"{file_key}\0{CONFIG}\0".encode() + cfg.raw)
