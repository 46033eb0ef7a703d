"""Every module kohya's trainer targets lands on the right LDM tensor with the right shape.

The expected names are derived here from the published rules (A1111's
convert_diffusers_name_to_compvis, kohya's SDXL naming, OpenCLIP's stacked in_proj), one module
at a time, and checked against the shapes of a demo checkpoint's real key list.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from mergebuild.demo import model_layout
from mergebuild.lora.formats import parse
from mergebuild.lora.source import LoraSource

SCALE = 1 / 64
U = "model.diffusion_model."
TE1 = "conditioner.embedders.0.transformer."
RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
          "conv_shortcut": "skip_connection"}  # fmt: skip
ATTN = ["proj_in", "proj_out"] + [
    f"transformer_blocks_{{t}}_{p}"
    for p in (
        *(f"attn{n}_to_{w}" for n in (1, 2) for w in ("q", "k", "v", "out_0")),
        "ff_net_0_proj",
        "ff_net_2",
    )
]
TE_PARTS = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
            "mlp_fc1", "mlp_fc2"]  # fmt: skip


def _attn_ldm(part: str) -> str:
    return (
        part.replace("transformer_blocks_", "transformer_blocks.")
        .replace("_attn", ".attn")
        .replace("_to_", ".to_")
        .replace("out_0", "out.0")
        .replace("_ff_net_0_proj", ".ff.net.0.proj")
        .replace("_ff_net_2", ".ff.net.2")
    )


def sd1_expected() -> dict[str, str]:
    """kohya SD1 module name → LDM weight key, from A1111's conversion rules."""
    out = {}

    def attn(prefix: str, ldm: str) -> None:
        for part in ATTN:
            p = part.format(t=0)
            out[f"{prefix}_{p}"] = f"{ldm}.{_attn_ldm(p)}.weight"

    def resnet(prefix: str, ldm: str) -> None:
        for name, ldm_part in RESNET.items():
            out[f"{prefix}_{name}"] = f"{ldm}.{ldm_part}.weight"

    for i in range(4):
        for j in range(2):
            resnet(f"lora_unet_down_blocks_{i}_resnets_{j}", f"{U}input_blocks.{1 + 3 * i + j}.0")
            if i < 3:
                attn(
                    f"lora_unet_down_blocks_{i}_attentions_{j}",
                    f"{U}input_blocks.{1 + 3 * i + j}.1",
                )
        if i < 3:
            out[f"lora_unet_down_blocks_{i}_downsamplers_0_conv"] = (
                f"{U}input_blocks.{3 + 3 * i}.0.op.weight"
            )
        for j in range(3):
            resnet(f"lora_unet_up_blocks_{i}_resnets_{j}", f"{U}output_blocks.{3 * i + j}.0")
            if i > 0:
                attn(f"lora_unet_up_blocks_{i}_attentions_{j}", f"{U}output_blocks.{3 * i + j}.1")
        if i < 3:
            sub = 2 if i > 0 else 1
            out[f"lora_unet_up_blocks_{i}_upsamplers_0_conv"] = (
                f"{U}output_blocks.{2 + 3 * i}.{sub}.conv.weight"
            )
    attn("lora_unet_mid_block_attentions_0", f"{U}middle_block.1")
    for j in range(2):
        resnet(f"lora_unet_mid_block_resnets_{j}", f"{U}middle_block.{2 * j}")
    out["lora_unet_time_embedding_linear_1"] = f"{U}time_embed.0.weight"
    out["lora_unet_time_embedding_linear_2"] = f"{U}time_embed.2.weight"
    te = "cond_stage_model.transformer.text_model.encoder.layers"
    for n in range(12):
        for part in TE_PARTS:
            a, b = part.split("_", 1) if part.startswith("mlp") else ("self_attn", part[10:])
            out[f"lora_te_text_model_encoder_layers_{n}_{part}"] = f"{te}.{n}.{a}.{b}.weight"
    return out


def factors(shape: tuple[int, ...], rank: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(abs(hash(shape)) % 2**32)
    kernel = shape[2:]
    down = rng.standard_normal((rank, shape[1], *kernel)).astype(np.float16)
    up = rng.standard_normal((shape[0], rank, *(1,) * len(kernel))).astype(np.float16)
    return down, up


def write(path: Path, modules: dict[str, tuple[int, ...]]) -> Path:
    t = {}
    for name, shape in modules.items():
        down, up = factors(shape)
        t[f"{name}.lora_down.weight"], t[f"{name}.lora_up.weight"] = down, up
        t[f"{name}.alpha"] = np.array(1.0, dtype=np.float16)
    save_file(t, str(path))
    return path


def test_sd1_every_kohya_module(tmp_path: Path) -> None:
    layout = {k: shape for k, (_, shape) in model_layout("sd1", SCALE).items()}
    expected = {m: k for m, k in sd1_expected().items() if k in layout}
    # shortcut convs exist only where channels change; every other rule hits a real key
    missing = [m for m, k in sd1_expected().items() if k not in layout]
    assert missing and all(m.endswith("_conv_shortcut") for m in missing)
    path = write(tmp_path / "sd1.safetensors", {m: layout[k] for m, k in expected.items()})
    src = LoraSource(path)
    assert src.info.format == "kohya" and src.info.family == "sd1" and not src.unmapped
    infos = src.infos()
    for module, key in expected.items():
        assert [p.module for p in src.placements[key]] == [module]
        assert infos[key].shape == layout[key], key
    assert len(infos) == len(expected)
    # nothing kohya trains in the UNet's attention or resnets is left out
    wanted = [
        k
        for k in layout
        if re.search(
            r"\.(to_[qkv]|to_out\.0|proj_in|proj_out|ff\.net\.[02](\.proj)?|in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection|op|conv)\.weight$",
            k,
        )
        and k.startswith(U)
    ]
    assert set(wanted) <= set(infos)
    src.close()


def test_sd1_peft_names_map_like_kohya(tmp_path: Path) -> None:
    layout = {k: shape for k, (_, shape) in model_layout("sd1", SCALE).items()}
    cases = {
        "unet.down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k":
            f"{U}input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
        "unet.up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj":
            f"{U}output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0":
            f"{U}middle_block.1.transformer_blocks.0.attn1.to_out.0.weight",
        "text_encoder.text_model.encoder.layers.11.mlp.fc2":
            "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
    }  # fmt: skip
    t = {}
    for module, key in cases.items():
        down, up = factors(layout[key])
        t[f"{module}.lora_A.weight"], t[f"{module}.lora_B.weight"] = down, up
    save_file(t, str(tmp_path / "peft.safetensors"))
    src = LoraSource(tmp_path / "peft.safetensors")
    assert src.info.format == "peft" and not src.unmapped
    assert set(src.infos()) == set(cases.values())
    for key in cases.values():
        assert src.infos()[key].shape == layout[key]
    src.close()


def sdxl_expected(layout: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, int | None]]:
    """kohya SDXL names (LDM paths with `_`) → (key, q/k/v index into in_proj or None)."""
    out: dict[str, tuple[str, int | None]] = {}
    pattern = re.compile(
        r"\.(to_[qkv]|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2|in_layers\.2|"
        r"out_layers\.3|emb_layers\.1|skip_connection|op|conv|time_embed\.[02]|label_emb\.0\.[02])"
        r"\.weight$"
    )
    for key in layout:
        if key.startswith(U) and pattern.search("." + key[len(U) :]):
            out["lora_unet_" + key[len(U) : -len(".weight")].replace(".", "_")] = (key, None)
    te1 = "conditioner.embedders.0.transformer."
    te2 = "conditioner.embedders.1.model.transformer.resblocks"
    for key in layout:
        if key.startswith(te1 + "text_model.encoder.layers.") and re.search(
            r"(q_proj|k_proj|v_proj|out_proj|fc1|fc2)\.weight$", key
        ):
            out["lora_te1_" + key[len(te1) : -len(".weight")].replace(".", "_")] = (key, None)
    for n in range(32):
        for i, w in enumerate("qkv"):
            out[f"lora_te2_text_model_encoder_layers_{n}_self_attn_{w}_proj"] = (
                f"{te2}.{n}.attn.in_proj_weight",
                i,
            )
        out[f"lora_te2_text_model_encoder_layers_{n}_self_attn_out_proj"] = (
            f"{te2}.{n}.attn.out_proj.weight",
            None,
        )
        out[f"lora_te2_text_model_encoder_layers_{n}_mlp_fc1"] = (
            f"{te2}.{n}.mlp.c_fc.weight",
            None,
        )
        out[f"lora_te2_text_model_encoder_layers_{n}_mlp_fc2"] = (
            f"{te2}.{n}.mlp.c_proj.weight",
            None,
        )
    return out


def test_sdxl_every_kohya_module_and_te2_in_proj_rows(tmp_path: Path) -> None:
    layout = {k: shape for k, (_, shape) in model_layout("sdxl", SCALE).items()}
    expected = sdxl_expected(layout)
    assert (
        sum(1 for _, (k, _i) in expected.items() if ".attn2.to_k." in k) == 70
    )  # SDXL's 70 blocks
    modules = {}
    for module, (key, part) in expected.items():
        shape = layout[key]
        modules[module] = (shape[0] // 3, *shape[1:]) if part is not None else shape
    path = write(tmp_path / "xl.safetensors", modules)
    src = LoraSource(path)
    assert src.info.family == "sdxl" and not src.unmapped
    infos = src.infos()
    for module, (key, part) in expected.items():
        assert infos[key].shape == layout[key], key
        place = [p for p in src.placements[key] if p.module == module]
        assert len(place) == 1
        if part is not None:
            d = layout[key][0] // 3
            assert place[0].rows == (part * d, (part + 1) * d)
    # numbers: the v_proj ΔW of layer 5 lands in rows [2d, 3d) of in_proj_weight, alone
    key = "conditioner.embedders.1.model.transformer.resblocks.5.attn.in_proj_weight"
    solo = {
        m: s
        for m, s in modules.items()
        if m == "lora_te2_text_model_encoder_layers_5_self_attn_v_proj"
    }
    write(tmp_path / "v.safetensors", solo)
    one = LoraSource(tmp_path / "v.safetensors")
    got = one.delta(key).numpy()
    down, up = factors(next(iter(solo.values())))
    d = layout[key][0] // 3
    ref = up.astype(np.float64) @ down.astype(np.float64) * (1.0 / 2)  # alpha 1, rank 2
    assert np.allclose(got[2 * d :], ref, rtol=1e-6, atol=1e-6)
    assert not got[: 2 * d].any()
    one.close()
    src.close()


def test_sdxl_diffusers_names(tmp_path: Path) -> None:
    layout = {k: shape for k, (_, shape) in model_layout("sdxl", SCALE).items()}
    cases = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k":
            (f"{U}input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight", None),
        "unet.down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2":
            (f"{U}input_blocks.8.1.transformer_blocks.9.ff.net.2.weight", None),
        "unet.up_blocks.0.upsamplers.0.conv": (f"{U}output_blocks.2.2.conv.weight", None),
        "unet.up_blocks.2.resnets.2.conv2": (f"{U}output_blocks.8.0.out_layers.3.weight", None),
        "unet.down_blocks.0.downsamplers.0.conv": (f"{U}input_blocks.3.0.op.weight", None),
        "text_encoder.text_model.encoder.layers.3.self_attn.q_proj":
            (TE1 + "text_model.encoder.layers.3.self_attn.q_proj.weight", None),
        "text_encoder_2.text_model.encoder.layers.3.self_attn.k_proj":
            ("conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight", 1),
    }  # fmt: skip
    t = {}
    for module, (key, part) in cases.items():
        shape = layout[key]
        shape = (shape[0] // 3, *shape[1:]) if part is not None else shape
        down, up = factors(shape)
        t[f"{module}.lora_A.weight"], t[f"{module}.lora_B.weight"] = down, up
    save_file(t, str(tmp_path / "xl.safetensors"))
    src = LoraSource(tmp_path / "xl.safetensors")
    assert src.info.family == "sdxl" and not src.unmapped
    for key, _ in cases.values():
        assert src.infos()[key].shape == layout[key]
    src.close()


@pytest.mark.parametrize(
    ("names", "family"),
    [
        (["lora_te1_text_model_encoder_layers_0_mlp_fc1"], "sdxl"),
        (["lora_unet_input_blocks_7_1_transformer_blocks_3_attn1_to_q"], "sdxl"),
        (["lora_unet_down_blocks_3_resnets_0_conv1"], "sd1/sd2"),
        (["lora_te_text_model_encoder_layers_20_mlp_fc1"], "sd2"),
    ],
)
def test_family_from_structure(names: list[str], family: str) -> None:
    class Info:
        shape = (2, 4)

    infos = {f"{n}.{p}": Info() for n in names for p in ("lora_down.weight", "lora_up.weight")}
    assert parse(infos).family == family
