"""The reverse of keymap: which kohya modules a checkpoint's tensors are, for writing LoRAs.

kohya names SD1/SD2 UNet modules by their diffusers paths (`down_blocks_0_attentions_0_…`) and
SDXL's by their LDM paths; text encoders by their HF-CLIP paths (`lora_te_`, SDXL `lora_te1_` /
`lora_te2_`), an OpenCLIP `attn.in_proj_weight` giving three modules, one per third of its rows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from mergebuild.lora.keymap import CLIP_ROOT, OPENCLIP_ROOT, UNET

RESNET_NAMES = {
    "in_layers.2": "conv1",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
# what kohya's trainer wraps: transformer modules always; resnets and samplers with conv ranks
ATTN = re.compile(r"\.(proj_in|proj_out|attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2))\.weight$")
RESNET = re.compile(
    r"\.(\d+\.(in_layers\.2|out_layers\.3|skip_connection|emb_layers\.1)|\d+\.op|\d+\.conv)\.weight$"
)
CLIP_PARTS = re.compile(r"\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight$")
OPENCLIP_PARTS = {
    "attn.out_proj.weight": "self_attn_out_proj",
    "mlp.c_fc.weight": "mlp_fc1",
    "mlp.c_proj.weight": "mlp_fc2",
}
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")


def _diffusers(rest: str) -> str | None:
    """An LDM UNet path (no `.weight`) as kohya's diffusers-style name, or None."""
    if m := re.match(r"^input_blocks\.(\d+)\.(\d+)\.(.+)$", rest):
        n, sub, tail = int(m[1]), int(m[2]), m[3]
        if n == 0:
            return None
        i, j = divmod(n - 1, 3)
        if j == 2:
            return f"down_blocks_{i}_downsamplers_0_conv" if tail == "op" else None
        block = f"down_blocks_{i}_{'attentions' if sub == 1 else 'resnets'}_{j}"
    elif m := re.match(r"^output_blocks\.(\d+)\.(\d+)\.(.+)$", rest):
        n, sub, tail = int(m[1]), int(m[2]), m[3]
        i, j = divmod(n, 3)
        if tail == "conv":
            return f"up_blocks_{i}_upsamplers_0_conv"
        block = f"up_blocks_{i}_{'attentions' if sub == 1 else 'resnets'}_{j}"
    elif m := re.match(r"^middle_block\.(\d+)\.(.+)$", rest):
        sub, tail = int(m[1]), m[2]
        block = "mid_block_attentions_0" if sub == 1 else f"mid_block_resnets_{sub // 2}"
    else:
        return None
    if "resnets" in block:
        if tail not in RESNET_NAMES:
            return None
        tail = RESNET_NAMES[tail]
    return f"{block}_{tail.replace('.', '_')}"


def modules_of(
    keys: Iterable[str], family: str, resnets: bool = False, text_encoder: bool = True
) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """kohya module name → (checkpoint key, (third, 3) of an OpenCLIP in_proj or None) for
    every module kohya trains in a `family` checkpoint with these keys."""
    out: dict[str, tuple[str, tuple[int, int] | None]] = {}
    te1 = "lora_te1_" if family == "sdxl" else "lora_te_"
    clip, openclip = CLIP_ROOT.get(family), OPENCLIP_ROOT.get(family)
    for key in sorted(keys):
        if key.startswith(UNET):
            if not (ATTN.search(key) or (resnets and RESNET.search(key))):
                continue
            rest = key[len(UNET) : -len(".weight")]
            name = rest.replace(".", "_") if family == "sdxl" else _diffusers(rest)
            if name is not None:
                out[f"lora_unet_{name}"] = (key, None)
        elif not text_encoder:
            continue
        elif clip and key.startswith(clip) and CLIP_PARTS.search(key):
            out[te1 + key[len(clip) : -len(".weight")].replace(".", "_")] = (key, None)
        elif openclip and key.startswith(openclip):
            m = _RESBLOCK.match(key[len(openclip) :])
            if not m:
                continue
            te = "lora_te2_" if family == "sdxl" else "lora_te_"
            layer = f"{te}text_model_encoder_layers_{m[1]}_"
            if m[2] == "attn.in_proj_weight":
                for i, w in enumerate("qkv"):
                    out[f"{layer}self_attn_{w}_proj"] = (key, (i, 3))
            elif m[2] in OPENCLIP_PARTS:
                out[layer + OPENCLIP_PARTS[m[2]]] = (key, None)
    return out
