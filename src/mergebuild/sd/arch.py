"""Which Stable Diffusion architecture a checkpoint is, from key names and shapes alone.

Works on safetensors headers (or any key → object-with-`.shape` mapping), so `inspect` and the
merge planner never need torch. Names survive the shrunken synthetic models used in tests, and
so do the small dims that decide the variant (4/8/9 input channels) and the ranks that tell SD1
from SD2 (SD1's transformer `proj_in` is a 1×1 conv, rank 4; SD2 and SDXL use a linear, rank 2).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
UNET_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.")
VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
CONV_IN = "input_blocks.0.0.weight"
FAMILY_NAMES = {
    "sd1": "SD1.x",
    "sd2": "SD2.x",
    "sdxl": "SDXL",
    "sdxl_refiner": "SDXL refiner",
    "vae": "VAE",
    "unknown": "unknown",
}
VARIANTS = {4: "base", 9: "inpainting", 8: "pix2pix"}
COMPONENTS = ("unet", "text_encoder", "vae")
_INPUT_BLOCK = re.compile(r"input_blocks\.(\d+)\.")


class _Shaped(Protocol):
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Arch:
    family: str  # sd1 | sd2 | sdxl | sdxl_refiner | vae (VAE-only file) | unknown
    variant: str  # base | inpainting | pix2pix | "N-channel" | "" (no UNet)
    components: tuple[str, ...]  # which of unet, text_encoder, vae the file holds
    prefixed: bool  # ldm single-file prefixes (model.diffusion_model., first_stage_model.)
    in_channels: int | None  # of the UNet's first conv

    @property
    def partial(self) -> bool:
        return self.family != "unknown" and set(self.components) != set(COMPONENTS)

    @property
    def known(self) -> bool:
        """A model family whose layout merges are checked against (not VAE-only, not unknown)."""
        return self.family in ("sd1", "sd2", "sdxl", "sdxl_refiner")

    @property
    def block_layout(self) -> str | None:
        """Block-weight layout: SD1 and SD2 share the 12/1/12 UNet, SDXL has 9/1/9."""
        return {"sd1": "sd1", "sd2": "sd1", "sdxl": "sdxl"}.get(self.family)

    def describe(self) -> str:
        name = FAMILY_NAMES[self.family]
        if self.family == "unknown":
            return "unknown (not a recognised Stable Diffusion layout)"
        if self.family == "vae":
            return f"VAE only{'' if self.prefixed else ' (no first_stage_model. prefix)'}"
        parts = [name]
        if self.variant and self.variant != "base":
            parts.append(self.variant)
        elif self.family == "sdxl":
            parts.append("base")
        text = " ".join(parts)
        if self.partial:
            only = ", ".join(self.components)
            text += f" ({only} only{'' if self.prefixed else ', no ldm prefix'})"
        return text

    def as_json(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "variant": self.variant,
            "components": list(self.components),
            "partial": self.partial,
            "prefixed": self.prefixed,
            "in_channels": self.in_channels,
            "description": self.describe(),
        }


def unet_root(keys: Mapping[str, Any]) -> str | None:
    """The prefix under which UNet keys live ("model.diffusion_model." or ""), None if no UNet."""
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return UNET_PREFIX
    if any(k.startswith(UNET_ROOTS) for k in keys):
        return ""
    return None


def detect(infos: Mapping[str, _Shaped]) -> Arch:
    """Classify a checkpoint from its tensor names and shapes."""
    root = unet_root(infos)
    te = _text_encoder_family(infos)
    has_vae = any(k.startswith(VAE_PREFIX) for k in infos)
    bare_vae = (
        not has_vae and root is None and te is None and any(k.startswith(VAE_ROOTS) for k in infos)
    )
    comps = []
    family, variant, in_ch = "unknown", "", None
    if root is not None:
        comps.append("unet")
        conv = infos.get(root + CONV_IN)
        if conv is not None and len(conv.shape) == 4:
            in_ch = int(conv.shape[1])
            variant = VARIANTS.get(in_ch, f"{in_ch}-channel")
        family = _unet_family(infos, root)
    if te is not None:
        comps.append("text_encoder")
        if family == "unknown":
            family = te
    if has_vae or bare_vae:
        comps.append("vae")
        if family == "unknown":
            family = "vae"
    if te == "sdxl_refiner" and family == "sdxl":
        family = te  # its UNet also has label_emb; only the text encoders tell them apart
    prefixed = root == UNET_PREFIX or has_vae or (root is None and te is not None)
    return Arch(family, variant, tuple(comps), prefixed, in_ch)


def _text_encoder_family(infos: Mapping[str, Any]) -> str | None:
    for k in infos:
        if k.startswith("conditioner.embedders."):
            # base: CLIP-L (embedders.0.transformer) + OpenCLIP-G; refiner: OpenCLIP-G alone
            refiner = not any(k.startswith("conditioner.embedders.0.transformer.") for k in infos)
            return "sdxl_refiner" if refiner else "sdxl"
        if k.startswith("cond_stage_model.model."):
            return "sd2"
        if k.startswith("cond_stage_model.transformer."):
            return "sd1"
    return None


def _unet_family(infos: Mapping[str, _Shaped], root: str) -> str:
    blocks = {
        int(m.group(1))
        for k in infos
        if k.startswith(root) and (m := _INPUT_BLOCK.match(k, len(root)))
    }
    if any(k.startswith(root + "label_emb.") for k in infos) or (blocks and max(blocks) == 8):
        return "sdxl"
    if blocks and max(blocks) == 11:
        proj = [
            len(v.shape)
            for k, v in infos.items()
            if k.startswith(root + "input_blocks.") and k.endswith(".proj_in.weight")
        ]
        if proj:
            return "sd2" if proj[0] == 2 else "sd1"
        return "sd1"
    return "unknown"


def is_position_ids(key: str) -> bool:
    """CLIP's `position_ids` buffer: an index table (int64 arange), never a weight to merge."""
    return key.endswith(".embeddings.position_ids")


def component_of(key: str, root: str | None = UNET_PREFIX) -> str:
    """unet | text_encoder | vae | other, for a key of a file whose UNet lives under `root`."""
    if key.startswith(UNET_PREFIX) or (root == "" and key.startswith((*UNET_ROOTS, "out."))):
        return "unet"
    if key.startswith(("cond_stage_model.", "conditioner.")):
        return "text_encoder"
    if key.startswith(VAE_PREFIX) or (root is None and key.startswith(VAE_ROOTS)):
        return "vae"
    return "other"


def merge_compatibility(names: list[str], archs: list[Arch]) -> str | None:
    """Why models of these architectures cannot be merged key by key, or None if they can."""
    a_name, a = names[0], archs[0]
    for name, other in zip(names[1:], archs[1:], strict=True):
        if a.known and other.known and a.family != other.family:
            return (
                f"'{a_name}' is {a.describe()} but '{name}' is {other.describe()}: "
                "models of different architectures cannot be merged"
            )
        shared = set(a.components) & set(other.components)
        if a.known and other.known and shared and a.prefixed != other.prefixed:
            return (
                f"'{a_name}' is {a.describe()} but '{name}' is {other.describe()}: one file uses "
                "the ldm key prefixes (model.diffusion_model., first_stage_model.) and the "
                "other does not, so no key would match"
            )
        if a.in_channels == 4 and other.in_channels in (8, 9):
            return (
                f"'{name}' is {other.describe()} ({other.in_channels} UNet input channels) but "
                f"'{a_name}' has 4: put the {other.variant} model in 'a' — the merge then "
                "applies to its first 4 input channels and keeps the others from 'a'"
            )
    return None


def extra_channels(key: str, a_shape: tuple[int, ...], other: tuple[int, ...]) -> bool:
    """True when `key` is an inpainting/pix2pix first conv (8 or 9 input channels) in `a` and a
    plain 4-channel one in the other model: A1111's rule merges only the first 4 channels."""
    return (
        key.removeprefix(UNET_PREFIX) == CONV_IN
        and len(a_shape) == 4
        and len(other) == 4
        and a_shape[1] in (8, 9)
        and other[1] == 4
        and a_shape[0] == other[0]
        and a_shape[2:] == other[2:]
    )
