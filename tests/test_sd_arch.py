"""Architecture detection from key names and shapes; `inspect`; cross-architecture merges."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SCALE, SRC, run_cli
from mergebuild.engine.safetensors_io import TensorInfo, read_header
from mergebuild.sd.arch import component_of, detect, merge_compatibility, unet_root


@pytest.fixture(scope="session")
def sd_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SD1 and SDXL synthetic models, base and inpainting / pix2pix variants."""
    from mergebuild.demo import synthesize

    d = tmp_path_factory.mktemp("sdmodels")
    specs = {
        "sd1": ("sd1", 4),
        "sd1_inpaint": ("sd1", 9),
        "sd1_p2p": ("sd1", 8),
        "sdxl": ("sdxl", 4),
        "sdxl_inpaint": ("sdxl", 9),
    }
    return {
        n: synthesize(d / f"{n}.safetensors", n, arch=a, scale=SCALE, in_channels=c)
        for n, (a, c) in specs.items()
    }


def infos_of(path: Path) -> dict[str, TensorInfo]:
    return {k: v[0] for k, v in read_header(path).tensors.items()}


def only(infos: dict[str, TensorInfo], prefix: str, strip: bool) -> dict[str, TensorInfo]:
    return {(k[len(prefix) :] if strip else k): v for k, v in infos.items() if k.startswith(prefix)}


@pytest.mark.parametrize(
    ("name", "family", "variant", "text"),
    [
        ("sd1", "sd1", "base", "SD1.x"),
        ("sd1_inpaint", "sd1", "inpainting", "SD1.x inpainting"),
        ("sd1_p2p", "sd1", "pix2pix", "SD1.x pix2pix"),
        ("sdxl", "sdxl", "base", "SDXL base"),
        ("sdxl_inpaint", "sdxl", "inpainting", "SDXL inpainting"),
    ],
)
def test_full_models(sd_models: dict, name: str, family: str, variant: str, text: str) -> None:
    arch = detect(infos_of(sd_models[name]))
    assert (arch.family, arch.variant, arch.describe()) == (family, variant, text)
    assert arch.components == ("unet", "text_encoder", "vae") and not arch.partial
    assert arch.prefixed


@pytest.mark.parametrize("strip", [False, True])
@pytest.mark.parametrize("name", ["sd1", "sdxl", "sd1_inpaint"])
def test_partial_files(sd_models: dict, name: str, strip: bool) -> None:
    infos = infos_of(sd_models[name])
    unet = detect(only(infos, "model.diffusion_model.", strip))
    assert unet.components == ("unet",) and unet.partial
    assert unet.family == detect(infos).family and unet.variant == detect(infos).variant
    assert unet.prefixed is not strip
    assert ("no ldm prefix" in unet.describe()) is strip
    vae = detect(only(infos, "first_stage_model.", strip))
    assert (vae.family, vae.components, vae.prefixed) == ("vae", ("vae",), not strip)
    assert vae.describe().startswith("VAE only")


def test_sd2_from_openclip_keys_or_linear_proj_in(sd_models: dict) -> None:
    """SD2: OpenCLIP text encoder (cond_stage_model.model.*) and rank-2 proj_in in the UNet."""
    sd2 = {}
    for k, v in infos_of(sd_models["sd1"]).items():
        if k.startswith("cond_stage_model."):
            k = "cond_stage_model.model.transformer.resblocks.0." + k.rsplit(".", 1)[-1]
        if k.endswith((".proj_in.weight", ".proj_out.weight")):
            v = TensorInfo(v.dtype, v.shape[:2])  # SD2 uses linear projections
        sd2[k] = v
    assert detect(sd2).family == "sd2" and detect(sd2).describe() == "SD2.x"
    unet_only = only(sd2, "model.diffusion_model.", True)
    assert detect(unet_only).family == "sd2"
    assert detect(only(infos_of(sd_models["sd1"]), "model.diffusion_model.", True)).family == "sd1"


def test_unknown_layout() -> None:
    arch = detect({"foo.weight": TensorInfo("F32", (3, 3))})
    assert arch.family == "unknown" and not arch.known and not arch.partial


def test_components() -> None:
    assert component_of("model.diffusion_model.out.2.bias") == "unet"
    assert component_of("cond_stage_model.transformer.text_model.final_layer_norm.bias") == (
        "text_encoder"
    )
    assert component_of("conditioner.embedders.1.model.ln_final.bias") == "text_encoder"
    assert component_of("first_stage_model.decoder.conv_out.bias") == "vae"
    assert component_of("alphas_cumprod") == "other"
    assert component_of("model_ema.diffusion_modelout2bias") == "other"
    assert component_of("out.2.bias", root="") == "unet"
    assert component_of("decoder.conv_out.bias", root=None) == "vae"
    assert unet_root({"input_blocks.0.0.weight": 1}) == ""


def test_inspect_cli_does_not_import_torch(sd_models: dict) -> None:
    r = run_cli("inspect", sd_models["sd1_inpaint"])
    assert r.code == 0, r.err
    assert "architecture: SD1.x inpainting" in r.out and "input channels: 9" in r.out
    j = run_cli("inspect", sd_models["sdxl"], "--json").json
    assert j["architecture"]["family"] == "sdxl" and j["architecture"]["description"] == (
        "SDXL base"
    )
    assert j["components"]["text_encoder"] == sum(
        k.startswith("conditioner.") for k in infos_of(sd_models["sdxl"])
    )
    probe = (
        "import sys; from mergebuild.cli import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'torch imported'; raise SystemExit(rc)"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    for cmd in ("inspect", "blocks"):
        p = subprocess.run(
            [sys.executable, "-c", probe, cmd, str(sd_models["sd1"])],
            env=env,
            capture_output=True,
            text=True,
        )
        assert p.returncode == 0, p.stderr
    missing = run_cli("inspect", sd_models["sd1"].parent / "nope.safetensors")
    assert missing.code == 1 and "no such file" in missing.err and "Traceback" not in missing.err


def test_prefixed_and_bare_unet_files_do_not_merge(
    sd_models: dict, tmp_path: Path, cache: Path
) -> None:
    from safetensors.numpy import save_file

    from conftest import load_st

    full = load_st(sd_models["sd1"])
    prefix = "model.diffusion_model."
    bare = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
    save_file(bare, str(tmp_path / "unet.safetensors"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "mergebuild: 1\n"
        f"models: {{full: {sd_models['sd1']}, unet: {tmp_path / 'unet.safetensors'}}}\n"
        "merges: {m: full * 0.5 + unet * 0.5}\n"
        "outputs: {o: {from: m, path: out.safetensors}}\n"
    )
    r = run_cli(recipe, cache=cache)
    assert r.code == 1 and "Traceback" not in r.err
    assert "'unet' is SD1.x (unet only, no ldm prefix)" in r.err and "no key would match" in r.err


def test_merging_different_architectures_is_an_error(
    sd_models: dict, tmp_path: Path, cache: Path
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "mergebuild: 1\n"
        f"models: {{one: {sd_models['sd1']}, xl: {sd_models['sdxl']}}}\n"
        "merges: {m: one * 0.5 + xl * 0.5}\n"
        "outputs: {o: {from: m, path: out.safetensors}}\n"
    )
    r = run_cli(recipe, cache=cache)
    assert r.code == 1 and "Traceback" not in r.err
    assert "'one' is SD1.x but 'xl' is SDXL base" in r.err
    assert "different architectures" in r.err
    assert not (tmp_path / "out.safetensors").exists()


def test_sdxl_refiner_is_not_sdxl_base(sd_models: dict) -> None:
    """The refiner has only OpenCLIP-G (conditioner.embedders.0.model.*) and no CLIP-L."""
    refiner = {}
    for k, v in infos_of(sd_models["sdxl"]).items():
        if k.startswith("conditioner.embedders.0."):
            continue
        refiner[k.replace("conditioner.embedders.1.", "conditioner.embedders.0.")] = v
    arch = detect(refiner)
    assert arch.family == "sdxl_refiner" and arch.describe() == "SDXL refiner"
    assert arch.block_layout is None
    base = detect(infos_of(sd_models["sdxl"]))
    assert "different architectures" in (merge_compatibility(["b", "r"], [base, arch]) or "")
