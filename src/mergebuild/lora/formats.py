"""Group a LoRA file's tensors into modules; name its format, algorithm and base architecture.

Only the header is needed (names and shapes), so `inspect` and the recipe checks run without
torch. Formats: kohya/A1111 (`lora_unet_…`, `lora_te_…`, SDXL `lora_te1_`/`lora_te2_`) and
diffusers/PEFT (`unet.…lora_A.weight`), whose module paths are rewritten to kohya's spelling so
one key mapping serves both.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# tensor-name suffix → factor role
PARTS = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "alpha": "alpha",
    "dora_scale": "dora_scale",
    # PEFT's DoRA magnitude: one value per output row (newer PEFT saves it as a `.weight`)
    "lora_magnitude_vector.weight": "dora_scale",
    "lora_magnitude_vector": "dora_scale",
    **{
        f"{k}": k
        for k in (
            "hada_w1_a",
            "hada_w1_b",
            "hada_w2_a",
            "hada_w2_b",
            "hada_t1",
            "hada_t2",
            "lokr_w1",
            "lokr_w1_a",
            "lokr_w1_b",
            "lokr_w2",
            "lokr_w2_a",
            "lokr_w2_b",
            "lokr_t2",
        )
    },
}
KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_")
PEFT_PREFIXES = {"unet.": "lora_unet_", "text_encoder_2.": "lora_te2_", "text_encoder.": "lora_te_"}
FAMILIES = ("sd1", "sd2", "sdxl")
ALGORITHMS = ("lora", "locon", "loha", "lokr")


class LoraFormatError(Exception):
    """The file is not a LoRA mergebuild can read (message names the keys)."""


@dataclass
class Module:
    """One LoRA module: its kohya-spelled name and its factor tensors' shapes (by role)."""

    name: str  # e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    parts: dict[str, str] = field(default_factory=dict)  # role → tensor name in the file
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def algorithm(self) -> str:
        roles = self.parts
        if "hada_w1_a" in roles:
            return "loha"
        if any(r.startswith("lokr_") for r in roles):
            return "lokr"
        down = self.shapes.get("down", ())
        return "locon" if len(down) == 4 and (down[2:] != (1, 1) or "mid" in roles) else "lora"

    @property
    def tucker(self) -> bool:
        return any(r in self.parts for r in ("mid", "hada_t1", "lokr_t2"))

    @property
    def dora(self) -> bool:
        return "dora_scale" in self.parts

    @property
    def rank(self) -> int | None:
        s = self.shapes
        if "down" in s:
            return s["down"][0]
        if "hada_w1_b" in s:
            return s["hada_w1_b"][0]
        for role in ("lokr_w1_b", "lokr_w2_b"):  # A1111's order: w1's rank first
            if role in s:
                return s[role][0]
        return None  # a LoKr with both factors full: no rank, scale 1

    def missing(self) -> list[str]:
        """Roles this module's algorithm needs but the file lacks."""
        need = {
            "lora": ["down", "up"],
            "locon": ["down", "up"],
            "loha": ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"],
        }.get(self.algorithm)
        if need is None:  # lokr: each of w1 and w2 full or as a pair
            need = []
            for w in ("lokr_w1", "lokr_w2"):
                if w not in self.parts and not {f"{w}_a", f"{w}_b"} <= set(self.parts):
                    need.append(w)
            return need
        return [r for r in need if r not in self.parts]


@dataclass
class LoraInfo:
    format: str  # kohya | peft
    modules: dict[str, Module]
    family: str  # sd1 | sd2 | sdxl | sd1/sd2 (UNet-only names that fit both)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def algorithms(self) -> list[str]:
        return sorted({m.algorithm for m in self.modules.values()}, key=ALGORITHMS.index)

    def families(self) -> tuple[str, ...]:
        return ("sd1", "sd2") if self.family == "sd1/sd2" else (self.family,)


def is_lora(keys: Mapping[str, Any]) -> bool:
    """A LoRA file: every tensor is a LoRA factor or under a kohya module prefix (so a LyCORIS
    part mergebuild cannot read, like `.diff`, is named by `parse`), and there is one."""
    n = 0
    for k in keys:
        if k == "__metadata__":
            continue
        if _split(k) is None and not (k.startswith(KOHYA_PREFIXES) and "." in k):
            return False
        n += 1
    return n > 0


def _split(key: str) -> tuple[str, str, str] | None:
    """(format, kohya module name, role) of a LoRA tensor name, or None."""
    suffix = next((s for s in PARTS if key.endswith("." + s)), None)
    if suffix is None:
        return None
    module, role = key[: -len(suffix) - 1], PARTS[suffix]
    if module.startswith(KOHYA_PREFIXES) and "." not in module:
        return "kohya", module, role
    path = module.removeprefix("base_model.model.")
    for prefix, kohya in PEFT_PREFIXES.items():
        if path.startswith(prefix):
            return "peft", kohya + path[len(prefix) :].replace(".", "_"), role
    return None


def parse(infos: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> LoraInfo:
    """Modules, format and family from tensor names → objects with `.shape`."""
    modules: dict[str, Module] = {}
    formats = set()
    bad = []
    for key, info in infos.items():
        got = _split(key)
        if got is None:
            bad.append(key)
            continue
        fmt, name, role = got
        formats.add(fmt)
        m = modules.setdefault(name, Module(name))
        m.parts[role] = key
        m.shapes[role] = tuple(info.shape)
    if bad:
        raise LoraFormatError(
            f"{len(bad)} tensors are not LoRA factors, e.g. {', '.join(sorted(bad)[:3])}"
        )
    if not modules:
        raise LoraFormatError("no LoRA tensors")
    if "peft" in formats and any(n.startswith("lora_te2_") for n in modules):
        for name in [n for n in modules if n.startswith("lora_te_")]:  # diffusers SDXL: te1
            m = modules.pop(name)
            m.name = "lora_te1_" + name.removeprefix("lora_te_")
            modules[m.name] = m
    incomplete = [f"{n} (no {', '.join(m.missing())})" for n, m in modules.items() if m.missing()]
    if incomplete:
        raise LoraFormatError(f"incomplete modules: {', '.join(sorted(incomplete)[:5])}")
    fmt = "peft" if formats == {"peft"} else "kohya" if formats == {"kohya"} else "mixed"
    return LoraInfo(fmt, modules, family_of(modules), dict(metadata or {}))


_TE_LAYER = re.compile(r"^lora_te_text_model_encoder_layers_(\d+)_")
_DIFFUSERS = re.compile(r"^lora_unet_(down_blocks|up_blocks|mid_block)_")
_LDM = re.compile(r"^lora_unet_(input_blocks|output_blocks|middle_block)_(\d+)_(\d+)?")


def family_of(modules: Mapping[str, Module]) -> str:
    """sd1 | sd2 | sdxl | sd1/sd2, from structure first (it survives shrunken test models),
    then from widths (768 / 1024 / 2048 cross-attention context, 768 / 1024 text encoder)."""
    names = list(modules)
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in names):
        return "sdxl"
    sd = sdxl = False
    for n in names:
        if re.search(r"_transformer_blocks_[2-9]_", n) or "_label_emb_" in n:
            sdxl = True
        if re.match(r"^lora_unet_(down_blocks_3|up_blocks_3|down_blocks_0_attentions)", n):
            sd = True
        m = _LDM.match(n)
        if m and m.group(1) != "middle_block":
            idx, sub = int(m.group(2)), m.group(3)
            if idx >= 9 or (m.group(1) == "input_blocks" and idx in (1, 2) and sub == "1"):
                sd = True
    if sdxl and not sd:
        return "sdxl"
    ctx = _context_width(modules)
    if ctx == 2048:
        return "sdxl"
    if not sd and not any(_DIFFUSERS.match(n) for n in names) and any(_LDM.match(n) for n in names):
        return "sdxl"  # kohya writes SDXL UNets with LDM names, SD1/SD2 with diffusers names
    # SD1 or SD2: SD2's proj_in is linear, its OpenCLIP has 23 layers, its widths are 1024
    for n, m in modules.items():
        if n.endswith(("_proj_in", "_proj_out")) and "down" in m.shapes:
            return "sd2" if len(m.shapes["down"]) == 2 else "sd1"
        t = _TE_LAYER.match(n)
        if t and int(t.group(1)) >= 12:
            return "sd2"
    if ctx in (768, 1024):
        return "sd1" if ctx == 768 else "sd2"
    for n, m in modules.items():
        down = m.shapes.get("down", ())
        if n.startswith("lora_te_") and n.endswith("q_proj") and down[1:] in ((768,), (1024,)):
            return "sd1" if down[1] == 768 else "sd2"
    return "sd1/sd2"


def _context_width(modules: Mapping[str, Module]) -> int | None:
    """Input width of a cross-attention to_k/to_v (the text embedding width), if a plain LoRA."""
    for n, m in modules.items():
        if n.endswith(("_attn2_to_k", "_attn2_to_v")) and "down" in m.shapes:
            return m.shapes["down"][1]
    return None
