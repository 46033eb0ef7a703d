"""What a bake refuses: a LoRA where the checkpoint goes (or the reverse), a LoRA for another
architecture, modules that map to no tensor of the checkpoint or to one of another shape.

Each refusal names the modules/keys (a few, and how many in all). With `strict: false` the
modules that map nowhere are skipped instead, and said so in a warning with their count.
"""

from __future__ import annotations

import math
from typing import Any

from mergebuild.errors import BuildError
from mergebuild.lora.source import LoraSource
from mergebuild.sd.arch import FAMILY_NAMES, detect
from mergebuild.sd.blocks import LAYOUT_NAMES, BlockAlpha

SHOWN = 5


def _few(items: list[str]) -> str:
    items = sorted(items)
    more = f" … ({len(items)} in all)" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def _same_but_singletons(x: tuple[int, ...], y: tuple[int, ...]) -> bool:
    """Equal once trailing 1-sized dimensions are dropped ([o, i] and [o, i, 1, 1])."""

    def strip(s: tuple[int, ...]) -> tuple[int, ...]:
        while len(s) > 2 and s[-1] == 1:
            s = s[:-1]
        return s

    return x != y and strip(x) == strip(y)


def _check_dora(job: str, a_name: str, lora_name: str, a: Any, src: LoraSource) -> None:
    """A DoRA update needs `a`'s weights: `a` must be a file this pass reads (a model or a
    cached node), and each magnitude vector must have one value per output row or per input
    column of its module."""
    if a is None:
        raise BuildError(
            f"cannot bake '{job}': LoRA '{lora_name}' uses DoRA (dora_scale), whose update "
            f"depends on the weights it is baked into, and '{a_name}' is computed in this build; "
            "bake it into a model file, or into a node built first (`cache: true`, then rebuild)"
        )
    bad = []
    for places in src.placements.values():
        for p in places:
            m = src.info.modules[p.module]
            if m.dora:
                n = math.prod(m.shapes["dora_scale"])
                if n not in (p.shape[0], p.shape[1]):
                    bad.append(
                        f"{p.module} (dora_scale {list(m.shapes['dora_scale'])}, ΔW "
                        f"{list(p.shape)})"
                    )
    if bad:
        raise BuildError(
            f"cannot bake '{job}': LoRA '{lora_name}' has magnitudes (dora_scale) of the wrong "
            f"size: {_few(bad)}; DoRA stores one per output row or per input column"
        )
    src.bind_base(a_name, a)


def check_bake(job: Any, sources: list[Any], layouts: list[dict[str, Any]]) -> list[str]:
    """Raise BuildError for what cannot be baked; return warnings. Keys skipped under
    `strict: false` are removed from that LoRA's layout in this pass (`layouts[i]`)."""
    name, names = job.name, job.inputs
    if isinstance(sources[0], LoraSource):
        raise BuildError(
            f"cannot bake '{name}': its 'a' ('{names[0]}') is a LoRA; 'a' is the checkpoint the "
            "LoRAs are baked into"
        )
    a = layouts[0]
    arch = detect(a)
    warnings: list[str] = []
    strengths = job.params.per_lora(len(names) - 1)
    for i, (src, lay) in enumerate(zip(sources[1:], layouts[1:], strict=True), 1):
        if not isinstance(src, LoraSource):
            raise BuildError(
                f"cannot bake '{name}': '{names[i]}' is not a LoRA file (its keys are a "
                "checkpoint's); merge checkpoints with a merge method instead"
            )
        info = src.info
        if src.alpha_note:
            warnings.append(f"bake '{name}': {src.alpha_note}")
        want = arch.block_layout
        s = strengths[i - 1]
        if isinstance(s, BlockAlpha) and s.layout and want and s.layout != want:
            raise BuildError(
                f"cannot bake '{name}': the strength of '{names[i]}' uses the "
                f"{LAYOUT_NAMES[s.layout]} block layout but '{names[0]}' is {arch.describe()}"
            )
        if arch.known and arch.family not in info.families():
            some = _few(list(info.modules))
            lora_arch = " or ".join(FAMILY_NAMES[f] for f in info.families())
            raise BuildError(
                f"cannot bake '{name}': LoRA '{names[i]}' is for {lora_arch} but '{names[0]}' is "
                f"{arch.describe()}; its modules ({some}) have no place in that model"
            )
        if src.dora_keys:
            _check_dora(name, names[0], names[i], sources[0], src)
        missing = [f"{m} (no such module)" for m in src.unmapped]
        for key, places in src.placements.items():
            mods = ", ".join(p.module for p in places)
            have = a.get(key)
            if have is None:
                missing.append(f"{mods} → {key} (not in '{names[0]}')")
            elif _same_but_singletons(tuple(have.shape), lay[key].shape) and len(places) == 1:
                # a 1×1 conv's ΔW on a linear layer or the reverse (SD1 vs SD2 proj_in/out)
                src.reshape(key, tuple(have.shape))
                lay[key] = src.infos()[key]
            elif tuple(have.shape) != lay[key].shape:
                missing.append(
                    f"{mods} → {key} (ΔW {list(lay[key].shape)}, tensor {list(have.shape)})"
                )
                if not job.params.strict:
                    lay.pop(key)
        if missing and job.params.strict:
            raise BuildError(
                f"cannot bake '{name}': {len(missing)} modules of LoRA '{names[i]}' map to no "
                f"tensor of '{names[0]}': {_few(missing)} (strict: false skips them)"
            )
        if missing:
            warnings.append(
                f"bake '{name}': skipped {len(missing)} modules of LoRA '{names[i]}' that map to "
                f"no tensor of '{names[0]}': {_few(missing)}"
            )
    return warnings
