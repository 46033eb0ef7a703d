"""`mergebuild inspect LORA`: format, algorithm, base, ranks, alpha, blocks, `--keys`; the demo
LoRAs of every algorithm; and the light paths (inspect, dry-run, cached build) stay torch-free."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import SRC, run_cli

XL = "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k"
TE2 = "lora_te2_text_model_encoder_layers_7_self_attn_v_proj"


def _write(path: Path, alpha_dtype: type = np.float16) -> Path:
    rng = np.random.default_rng(0)
    t = {}
    for name, rank in ((XL, 8), (TE2, 4)):
        t[f"{name}.lora_down.weight"] = rng.standard_normal((rank, 12)).astype(np.float16)
        t[f"{name}.lora_up.weight"] = rng.standard_normal((12, rank)).astype(np.float16)
        t[f"{name}.alpha"] = np.array(rank / 2, dtype=alpha_dtype)
    save_file(t, str(path), metadata={"ss_network_dim": "8", "ss_base_model_version": "sdxl_base"})
    return path


@pytest.mark.parametrize("alpha_dtype", [np.float16, np.float32])
def test_inspect_sdxl_lora_json_and_keys(tmp_path: Path, alpha_dtype: type) -> None:
    path = _write(tmp_path / "xl.safetensors", alpha_dtype)
    r = run_cli("inspect", path, "--json", "--keys")
    assert r.code == 0, r.err
    j = r.json
    assert j["lora"] and j["format"] == "kohya" and j["base_architecture"] == "sdxl"
    assert j["algorithms"] == {"lora": 2} and j["ranks"] == {"4": 1, "8": 1}
    assert j["alphas"] == {"2": 1, "4": 1}
    assert j["components"] == {"text_encoder": 1, "unet": 1} and j["blocks"] == {"IN04": 1}
    assert j["keys"][XL]["key"] == (
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"
    )
    assert j["keys"][TE2] == {
        "key": "conditioner.embedders.1.model.transformer.resblocks.7.attn.in_proj_weight",
        "part": "3/3",
    }
    assert j["metadata"]["ss_base_model_version"] == "sdxl_base"
    text = run_cli("inspect", path, "--keys")
    assert text.code == 0 and "base:         SDXL" in text.out
    in_proj = "conditioner.embedders.1.model.transformer.resblocks.7.attn.in_proj_weight"
    assert f"{TE2} → {in_proj} (rows 3/3)" in text.out


@pytest.mark.parametrize(
    ("stem", "algorithm", "base"),
    [
        ("detail-lora", "lora", "SD1.x"),
        ("style-locon", "locon", "SD1.x"),
        ("texture-loha", "loha", "SD1.x or SD2.x"),
        ("pose-lokr", "lokr", "SD1.x or SD2.x"),
    ],
)
def test_inspect_demo_loras(model_dir: Path, stem: str, algorithm: str, base: str) -> None:
    r = run_cli("inspect", model_dir / f"{stem}.safetensors", "--json")
    assert r.code == 0, r.err
    j = r.json
    assert algorithm in j["algorithms"] and j["base_description"] == base
    assert not j["unmapped"] and "keys" not in j


def test_inspect_of_a_broken_lora_is_one_message(tmp_path: Path) -> None:
    path = tmp_path / "half.safetensors"
    save_file({"lora_unet_x_proj_in.lora_down.weight": np.zeros((2, 3), np.float16)}, str(path))
    r = run_cli("inspect", path)
    assert r.code == 1 and "Traceback" not in r.err
    assert "incomplete modules: lora_unet_x_proj_in (no up)" in r.err


def test_light_paths_do_not_import_torch(workdir: Path, cache: Path) -> None:
    recipe = workdir / "r.yaml"
    recipe.write_text(
        "mergebuild: 1\nmodels:\n  anything: models/anything-v3.safetensors\n"
        "  detail: models/detail-lora.safetensors\nmerges:\n  b: anything + lora(detail, 0.5)\n"
        "outputs:\n  b: {from: b, path: out/b.safetensors}\n"
    )
    probe = (
        "import sys; from mergebuild.cli import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'torch imported'; raise SystemExit(rc)"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "MERGEBUILD_CACHE_DIR": str(cache)}

    def light(*args: str | Path) -> None:
        p = subprocess.run(
            [sys.executable, "-c", probe, *map(str, args)], env=env, capture_output=True, text=True
        )
        assert p.returncode == 0, p.stderr

    light("inspect", workdir / "models" / "style-locon.safetensors", "--keys")
    light(recipe, "--dry-run")
    assert run_cli(recipe, cache=cache).code == 0
    light(recipe)  # fully cached


@pytest.mark.parametrize("part", ["diff", "w_norm", "on_input"])
def test_lycoris_parts_mergebuild_cannot_read_are_named(tmp_path: Path, part: str) -> None:
    path = tmp_path / "full.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file(
        {
            f"{name}.lora_down.weight": np.zeros((2, 3), np.float16),
            f"{name}.lora_up.weight": np.zeros((3, 2), np.float16),
            f"lora_unet_mid_block_attentions_0_proj_out.{part}": np.zeros((3, 3), np.float16),
        },
        str(path),
    )
    r = run_cli("inspect", path)
    assert r.code == 1 and "Traceback" not in r.err
    assert f"not LoRA factors, e.g. lora_unet_mid_block_attentions_0_proj_out.{part}" in r.err
