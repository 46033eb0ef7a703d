"""Inpainting / pix2pix conversion: only conv_in's first 4 channels merge (A1111's rule)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import EXAMPLES, SCALE, load_st, run_cli

CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


def f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32)


def test_example_inpainting_recipe_matches_numpy(workdir: Path, cache: Path) -> None:
    recipe = workdir / "inpainting.yaml"
    recipe.write_text((EXAMPLES / "inpainting.yaml").read_text())
    r = run_cli(recipe, "--json", cache=cache)
    assert r.code == 0, r.err
    a = load_st(workdir / "models" / "sd-v1-5-inpainting.safetensors")
    b = load_st(workdir / "models" / "anything-v3.safetensors")
    c = load_st(workdir / "models" / "v1-5-pruned.safetensors")
    out = load_st(workdir / "out" / "anything-v3-inpainting.safetensors")
    assert a[CONV_IN].shape[1] == 9 and b[CONV_IN].shape[1] == 4
    assert out[CONV_IN].shape == a[CONV_IN].shape
    for k, x in a.items():
        if x.dtype.kind != "f":
            np.testing.assert_array_equal(out[k], x)
            continue
        if k == CONV_IN:
            want = f32(x).copy()
            want[:, :4] = f32(x[:, :4]) + (f32(b[k]) - f32(c[k])) * np.float32(1.0)
        else:
            want = f32(x) + (f32(b[k]) - f32(c[k])) * np.float32(1.0)
        np.testing.assert_array_equal(out[k], want.astype(np.float16), err_msg=k)
    # exactly channels 0-3 changed; 4-8 are a's bytes
    np.testing.assert_array_equal(out[CONV_IN][:, 4:], a[CONV_IN][:, 4:])
    assert (out[CONV_IN][:, :4] != a[CONV_IN][:, :4]).mean() > 0.9
    inspect = run_cli("inspect", workdir / "out" / "anything-v3-inpainting.safetensors")
    assert "SD1.x inpainting" in inspect.out


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def p2p_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mergebuild.demo import synthesize

    arch = request.param
    d = tmp_path_factory.mktemp(f"p2p_{arch}")
    synthesize(d / "p2p.safetensors", "p2p", arch=arch, scale=SCALE, in_channels=8)
    synthesize(d / "target.safetensors", "target", arch=arch, scale=SCALE)
    return d


def test_pix2pix_weighted_sum_chunked(p2p_dir: Path, tmp_path: Path, cache: Path) -> None:
    """8 channels (SD1 and SDXL), weighted sum, tiny chunks so every other key is chunked."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "mergebuild: 1\n"
        f"models: {{p: {p2p_dir}/p2p.safetensors, t: {p2p_dir}/target.safetensors}}\n"
        "merges: {m: {method: weighted_sum, a: p, b: t, alpha: 0.3, dtype: fp32}}\n"
        "outputs: {o: {from: m, path: out.safetensors}}\n"
    )
    r = run_cli(recipe, "-j", "2", cache=cache, env={"MERGEBUILD_CHUNK_ELEMENTS": "64"})
    assert r.code == 0, r.err
    a, b = load_st(p2p_dir / "p2p.safetensors"), load_st(p2p_dir / "target.safetensors")
    out = load_st(tmp_path / "out.safetensors")
    for k, x in a.items():
        if x.dtype.kind != "f":
            continue
        if k == CONV_IN:
            want = f32(x).copy()
            want[:, :4] = f32(x[:, :4]) * np.float32(0.7) + f32(b[k]) * np.float32(0.3)
        else:
            want = f32(x) * np.float32(0.7) + f32(b[k]) * np.float32(0.3)
        np.testing.assert_array_equal(out[k], want, err_msg=k)
    np.testing.assert_array_equal(out[CONV_IN][:, 4:], f32(a[CONV_IN][:, 4:]))


def test_inpainting_model_in_b_is_an_error(workdir: Path, cache: Path) -> None:
    recipe = workdir / "r.yaml"
    recipe.write_text(
        "mergebuild: 1\n"
        "models:\n"
        "  inp: models/sd-v1-5-inpainting.safetensors\n"
        "  anything: models/anything-v3.safetensors\n"
        "  sd15: models/v1-5-pruned.safetensors\n"
        "merges: {m: anything + (inp - sd15) * 1.0}\n"
        "outputs: {o: {from: m, path: out/o.safetensors}}\n"
    )
    r = run_cli(recipe, cache=cache)
    assert r.code == 1 and "Traceback" not in r.err
    assert "'inp' is SD1.x inpainting (9 UNet input channels) but 'anything' has 4" in r.err
    assert "put the inpainting model in 'a'" in r.err
