"""Which Stable Diffusion architecture a checkpoint is, from key names and shapes alone.

SD1/SD2/SDXL UNets, and the diffusion transformers (DiT) of Flux.1 and SD3/SD3.5: for those, the
"unet" component is the transformer (shown as "diffuser"), and ComfyUI all-in-one files carry
their text encoders under `text_encoders.{clip_l,clip_g,t5xxl}.` and Flux's VAE under `vae.`.

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
# Flux transformer files often come with bare keys (no model.diffusion_model.)
FLUX_ROOTS = (
    "double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.",
    "guidance_in.", "final_layer.",
)  # fmt: skip
VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
TE_PREFIX = "text_encoders."  # ComfyUI all-in-one Flux/SD3: text_encoders.clip_l. …
FLUX_VAE_PREFIX = "vae."
TEXT_ENCODERS = ("clip_l", "clip_g", "t5xxl")
CONV_IN = "input_blocks.0.0.weight"
FLUX_IMG_IN = "img_in.weight"  # Flux's first layer: wider in Flux Fill
FAMILY_NAMES = {
    "sd1": "SD1.x",
    "sd2": "SD2.x",
    "sdxl": "SDXL",
    "sdxl_refiner": "SDXL refiner",
    "flux": "Flux.1",
    "sd3": "SD3",
    "vae": "VAE",
    "unknown": "unknown",
}
DIT_FAMILIES = ("flux", "sd3")
VARIANTS = {4: "base", 9: "inpainting", 8: "pix2pix"}
COMPONENTS = ("unet", "text_encoder", "vae")
_INPUT_BLOCK = re.compile(r"input_blocks\.(\d+)\.")
_JOINT_BLOCK = re.compile(r"joint_blocks\.(\d+)\.")


class _Shaped(Protocol):
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Arch:
    family: str  # sd1 | sd2 | sdxl | sdxl_refiner | flux | sd3 | vae (VAE-only file) | unknown
    # base | inpainting | pix2pix | "N-channel" | "" (no UNet); Flux: dev | schnell;
    # SD3: medium | 3.5 medium | 3.5 large
    variant: str
    components: tuple[str, ...]  # which of unet, text_encoder, vae the file holds
    prefixed: bool  # ldm single-file prefixes (model.diffusion_model., first_stage_model.)
    in_channels: int | None  # of the UNet's first conv
    text_encoders: tuple[str, ...] = ()  # clip_l, clip_g, t5xxl: those told apart by name

    @property
    def partial(self) -> bool:
        return self.family != "unknown" and set(self.components) != set(COMPONENTS)

    @property
    def known(self) -> bool:
        """A model family whose layout merges are checked against (not VAE-only, not unknown)."""
        return self.family in ("sd1", "sd2", "sdxl", "sdxl_refiner", *DIT_FAMILIES)

    @property
    def dit(self) -> bool:
        """A diffusion transformer (Flux, SD3): its "unet" component is the transformer."""
        return self.family in DIT_FAMILIES

    @property
    def block_layout(self) -> str | None:
        """Block-weight layout: SD1 and SD2 share the 12/1/12 UNet, SDXL has 9/1/9; Flux has
        19 double + 38 single blocks; SD3 and SD3.5 medium 24 joint blocks, SD3.5 large 38."""
        if self.family == "sd3":
            return "sd3_large" if self.variant == "3.5 large" else "sd3"
        return {"sd1": "sd1", "sd2": "sd1", "sdxl": "sdxl", "flux": "flux"}.get(self.family)

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
        if self.dit:
            held = ["transformer" if c == "unet" else c for c in self.components]
            if self.text_encoders:
                held[held.index("text_encoder")] = "+".join(self.text_encoders)
            if self.partial:
                bare = "" if self.prefixed else ", bare keys"
                return f"{text} ({', '.join(held)} only{bare})"
            return f"{text} (all-in-one: {', '.join(held)})"
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
            "text_encoders": list(self.text_encoders),
            "block_layout": self.block_layout,
            "description": self.describe(),
        }


def unet_root(keys: Mapping[str, Any]) -> str | None:
    """The prefix under which UNet keys live ("model.diffusion_model." or ""), None if no UNet."""
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return UNET_PREFIX
    if any(k.startswith((*UNET_ROOTS, *FLUX_ROOTS)) for k in keys):
        return ""
    return None


def detect(infos: Mapping[str, _Shaped]) -> Arch:
    """Classify a checkpoint from its tensor names and shapes."""
    root = unet_root(infos)
    te = _text_encoder_family(infos)
    tes = tuple(t for t in TEXT_ENCODERS if any(k.startswith(f"{TE_PREFIX}{t}.") for k in infos))
    if tes and te is None:
        te = "dit"  # ComfyUI's text_encoders.*: the transformer says which model
    has_vae = any(k.startswith((VAE_PREFIX, FLUX_VAE_PREFIX)) for k in infos)
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
        if family in DIT_FAMILIES:
            variant = _dit_variant(infos, root, family)
            img_in = infos.get(root + FLUX_IMG_IN)
            if family == "flux" and img_in is not None and len(img_in.shape) == 2:
                in_ch = int(img_in.shape[1])
                if _flux_fill(infos, root, in_ch):
                    variant = "fill"
    if te is not None:
        comps.append("text_encoder")
        if family == "unknown" and te != "dit":
            family = te
    if has_vae or bare_vae:
        comps.append("vae")
        if family == "unknown":
            family = "vae"
    if te == "sdxl_refiner" and family == "sdxl":
        family = te  # its UNet also has label_emb; only the text encoders tell them apart
    prefixed = root == UNET_PREFIX or has_vae or (root is None and te is not None)
    if family in DIT_FAMILIES:
        prefixed = root != ""  # only the transformer's keys come bare
    return Arch(family, variant, tuple(comps), prefixed, in_ch, tes)


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
    if root + "double_blocks.0.img_attn.qkv.weight" in infos or any(
        k.startswith(root + "single_blocks.") for k in infos
    ):
        return "flux"
    if any(k.startswith(root + "joint_blocks.") for k in infos):
        return "sd3"
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


def _flux_fill(infos: Mapping[str, _Shaped], root: str, in_ch: int) -> bool:
    """Flux Fill (inpainting) feeds image and mask latents with the noise: img_in takes 6×
    the patches final_layer gives out (384 vs 64 in the real model, and in shrunken ones)."""
    out = infos.get(root + "final_layer.linear.weight")
    return out is not None and len(out.shape) == 2 and in_ch == 6 * int(out.shape[0])


def _dit_variant(infos: Mapping[str, _Shaped], root: str, family: str) -> str:
    """Flux dev has guidance_in (schnell has none); SD3.5 large has 38 joint blocks, and SD3.5
    medium adds self-attention (`x_block.attn2`) to SD3 medium's 24."""
    if family == "flux":
        return "dev" if any(k.startswith(root + "guidance_in.") for k in infos) else "schnell"
    blocks = {
        int(m.group(1))
        for k in infos
        if k.startswith(root) and (m := _JOINT_BLOCK.match(k, len(root)))
    }
    if blocks and max(blocks) >= 37:
        return "3.5 large"
    if any(k.startswith(root + "joint_blocks.") and ".x_block.attn2." in k for k in infos):
        return "3.5 medium"
    return "medium"


def is_position_ids(key: str) -> bool:
    """CLIP's `position_ids` buffer: an index table (int64 arange), never a weight to merge."""
    return key.endswith(".embeddings.position_ids")


def component_of(key: str, root: str | None = UNET_PREFIX) -> str:
    """unet | text_encoder | vae | other, for a key of a file whose UNet lives under `root`
    ("unet" is the diffusion model, a transformer for Flux and SD3)."""
    if key.startswith(UNET_PREFIX) or (
        root == "" and key.startswith((*UNET_ROOTS, *FLUX_ROOTS, "out."))
    ):
        return "unet"
    if key.startswith(("cond_stage_model.", "conditioner.", TE_PREFIX)):
        return "text_encoder"
    if key.startswith((VAE_PREFIX, FLUX_VAE_PREFIX)) or (
        root is None and key.startswith(VAE_ROOTS)
    ):
        return "vae"
    return "other"


def text_encoder_of(key: str) -> str | None:
    """clip_l | clip_g | t5xxl for a text-encoder key whose model the name tells, else None
    (SD2's OpenCLIP-H): what per-component weights such as `clip_l: 0.3` apply to."""
    if key.startswith(TE_PREFIX):
        name = key[len(TE_PREFIX) :].split(".", 1)[0]
        return name if name in TEXT_ENCODERS else None
    if key.startswith("cond_stage_model.transformer."):
        return "clip_l"  # SD1: HF CLIP ViT-L/14
    if key.startswith("conditioner.embedders."):
        # SDXL: HF-named CLIP-L (`.transformer.`) and OpenCLIP-named bigG (`.model.`)
        parts = key.split(".", 4)
        if len(parts) > 3:
            return {"transformer": "clip_l", "model": "clip_g"}.get(parts[3])
    return None


def merge_compatibility(names: list[str], archs: list[Arch]) -> str | None:
    """Why models of these architectures cannot be merged key by key, or None if they can."""
    a_name, a = names[0], archs[0]
    for name, other in zip(names[1:], archs[1:], strict=True):
        if a.known and other.known and a.family != other.family:
            return (
                f"'{a_name}' is {a.describe()} but '{name}' is {other.describe()}: "
                "models of different architectures cannot be merged"
            )
        if (
            a.family == other.family == "sd3"
            and "unet" in a.components
            and ("unet" in other.components and a.variant != other.variant)
        ):
            return (
                f"'{a_name}' is {a.describe()} but '{name}' is {other.describe()}: "
                "SD3 models of different sizes cannot be merged"
            )
        if a.family == "flux" and other.variant == "fill" and a.variant != "fill":
            return (
                f"'{name}' is {other.describe()} (img_in takes {other.in_channels} inputs) but "
                f"'{a_name}' is not: put the Fill model in 'a' — the merge then applies to the "
                "inputs both share and keeps Fill's image and mask inputs from 'a'"
            )
        shared = set(a.components) & set(other.components)
        if a.family == "flux" and other.family == "flux":
            continue  # bare and prefixed transformer keys are mapped (flux_key_map)
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
    plain 4-channel one in the other model: A1111's rule merges only the first 4 channels. The
    same for Flux Fill's img_in against a plain Flux's (the noise-latent inputs come first)."""
    if key.removeprefix(UNET_PREFIX) == FLUX_IMG_IN:  # Flux Fill's img_in: the first 1/6
        return (
            len(a_shape) == len(other) == 2
            and a_shape[0] == other[0]
            and a_shape[1] == 6 * other[1]
        )
    return (
        key.removeprefix(UNET_PREFIX) == CONV_IN
        and len(a_shape) == 4
        and len(other) == 4
        and a_shape[1] in (8, 9)
        and other[1] == 4
        and a_shape[0] == other[0]
        and a_shape[2:] == other[2:]
    )


def flux_key_map(a: Arch, other: Arch, other_keys: Mapping[str, Any]) -> dict[str, str] | None:
    """For a Flux `other` spelled differently from `a` (bare vs model.diffusion_model.
    transformer keys; both are common): a's key → other's key, for every key other has.
    None when no mapping is needed. The result keeps a's spelling."""
    if a.family != "flux" or other.family != "flux" or a.prefixed == other.prefixed:
        return None
    if "unet" not in a.components or "unet" not in other.components:
        return None
    if a.prefixed:  # other is bare: only its transformer keys exist
        return {UNET_PREFIX + k: k for k in other_keys if not k.startswith(UNET_PREFIX)}
    return {k.removeprefix(UNET_PREFIX): k for k in other_keys if k.startswith(UNET_PREFIX)}
