"""Where each LoRA module lands in a checkpoint: its LDM tensor name, and rows for stacked ones.

kohya names are module paths with `.` turned into `_`, which is ambiguous (`to_q`, `proj_in`,
`ff_net_0_proj`): they are resolved against the architecture's real key list (the packaged
sd1/sdxl key tables), never by string replacement alone. diffusers-style UNet names
(`down_blocks_1_attentions_0`) are first renumbered to LDM blocks; OpenCLIP text encoders (SD2,
SDXL's second) take HF-CLIP module names whose q/k/v land in thirds of `attn.in_proj_weight`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

UNET = "model.diffusion_model."
CLIP_ROOT = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPENCLIP_ROOT = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model."}
RESNET_PARTS = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
}
OPENCLIP_PARTS = {
    "self_attn_out_proj": "attn.out_proj.weight",
    "mlp_fc1": "mlp.c_fc.weight",
    "mlp_fc2": "mlp.c_proj.weight",
}
QKV = {"self_attn_q_proj": 0, "self_attn_k_proj": 1, "self_attn_v_proj": 2}
_OPENCLIP = re.compile(r"^text_model_encoder_layers_(\d+)_(.+)$")


@dataclass(frozen=True)
class Target:
    """A module's checkpoint tensor; `part` = (index, parts) for a stacked q/k/v slice."""

    key: str
    part: tuple[int, int] | None = None
    shape: tuple[int, ...] | None = None  # the reference model's shape (kernel sizes), if known


@cache
def _table(family: str) -> dict[str, tuple[int, ...]]:
    """LDM weight key → reference shape for a family (SD2 shares SD1's UNet names)."""
    from mergebuild.demo import key_table

    src = "sdxl" if family == "sdxl" else "sd1"
    out = {k: tuple(v["shape"]) for k, v in key_table(src).items() if k.endswith(".weight")}
    if family == "sd2":
        out = {k: v for k, v in out.items() if k.startswith(UNET)}
        out = {
            k: (v[:2] if k.endswith((".proj_in.weight", ".proj_out.weight")) else v)
            for k, v in out.items()
        }
    return out


@cache
def _lookup(family: str) -> dict[str, str]:
    """Underscored module path → LDM key: `unet:input_blocks_1_1_proj_in`, `te:text_model_…`."""
    out = {}
    clip = CLIP_ROOT.get(family)
    for key in _table(family):
        mod = key.removesuffix(".weight")
        if mod.startswith(UNET):
            out["unet:" + mod[len(UNET) :].replace(".", "_")] = key
        elif clip and mod.startswith(clip):
            out["te:" + mod[len(clip) :].replace(".", "_")] = key
    return out


def _diffusers_unet(rest: str, family: str) -> str | None:
    """A diffusers UNet module path (underscored) as its LDM path (underscored), or None."""
    look = _lookup(family)
    if m := re.match(r"^(down|up)_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)$", rest):
        side, i, kind, j, part = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m[5]
        block = f"input_blocks_{1 + 3 * i + j}" if side == "down" else f"output_blocks_{3 * i + j}"
        if kind == "resnets":
            return f"{block}_0_{_resnet(part)}"
        return f"{block}_1_{part}"
    if m := re.match(r"^down_blocks_(\d+)_downsamplers_0_conv$", rest):
        return f"input_blocks_{3 + 3 * int(m.group(1))}_0_op"
    if m := re.match(r"^up_blocks_(\d+)_upsamplers_0_conv$", rest):
        n = 2 + 3 * int(m.group(1))
        for sub in (2, 1):  # after the attention when the block has one
            if f"unet:output_blocks_{n}_{sub}_conv" in look:
                return f"output_blocks_{n}_{sub}_conv"
        return None
    if m := re.match(r"^mid_block_attentions_0_(.+)$", rest):
        return f"middle_block_1_{m.group(1)}"
    if m := re.match(r"^mid_block_resnets_(\d+)_(.+)$", rest):
        return f"middle_block_{2 * int(m.group(1))}_{_resnet(m.group(2))}"
    fixed = {
        "conv_in": "input_blocks_0_0",
        "conv_out": "out_2",
        "conv_norm_out": "out_0",
        "time_embedding_linear_1": "time_embed_0",
        "time_embedding_linear_2": "time_embed_2",
        "add_embedding_linear_1": "label_emb_0_0",
        "add_embedding_linear_2": "label_emb_0_2",
    }
    return fixed.get(rest)


def _resnet(part: str) -> str:
    return RESNET_PARTS.get(part, part)


def target(module: str, family: str) -> Target | None:
    """The checkpoint tensor a kohya-spelled module updates in a `family` model, or None."""
    table, look = _table(family), _lookup(family)
    if module.startswith("lora_unet_"):
        rest = module.removeprefix("lora_unet_")
        key = look.get("unet:" + rest)
        if key is None:
            ldm = _diffusers_unet(rest, family)
            key = look.get(f"unet:{ldm}") if ldm else None
        return Target(key, None, table[key]) if key else None
    te = None
    if module.startswith("lora_te_"):
        te, rest = ("clip" if family == "sd1" else "openclip"), module.removeprefix("lora_te_")
        if family == "sdxl":
            return None  # SDXL LoRAs say which encoder: lora_te1_ / lora_te2_
    elif module.startswith("lora_te1_") and family == "sdxl":
        te, rest = "clip", module.removeprefix("lora_te1_")
    elif module.startswith("lora_te2_") and family == "sdxl":
        te, rest = "openclip", module.removeprefix("lora_te2_")
    if te == "clip":
        key = look.get("te:" + rest)
        return Target(key, None, table[key]) if key else None
    if te == "openclip":
        m = _OPENCLIP.match(rest)
        if not m:
            return None
        base = f"{OPENCLIP_ROOT[family]}transformer.resblocks.{m.group(1)}."
        if m.group(2) in QKV:
            return Target(base + "attn.in_proj_weight", (QKV[m.group(2)], 3))
        part = OPENCLIP_PARTS.get(m.group(2))
        return Target(base + part) if part else None
    return None
